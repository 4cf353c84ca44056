"""fast_exp (recur.ops.numba_math) against numpy's exp, inside compiled code, in both precisions.

The compiled kernels call fast_exp in place of np.exp, so its error enters every compiled
recurrence: it must stay within about one ulp everywhere, and keep exp's special values.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from recur.ops.numba_math import fast_exp, fast_sigmoid, fast_tanh


@njit(cache=False)
def _apply(x, out):
    for i in range(x.size):
        out[i] = fast_exp(x[i])


# The kernels that call fast_exp with reassociation allowed (for their reductions) must not
# reassociate inside it: x - n ln2_hi - n ln2_lo in another order loses the low bits of r.
@njit(cache=False, fastmath={"reassoc", "contract", "nsz"})
def _apply_reassoc(x, out):
    for i in range(x.size):
        out[i] = fast_exp(x[i])


def _exp(x: np.ndarray, kernel=_apply) -> np.ndarray:
    out = np.empty_like(x)
    kernel(x, out)
    return out


@pytest.mark.parametrize("kernel", [_apply, _apply_reassoc], ids=["strict", "reassoc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_within_one_ulp_over_the_normal_range(dtype, kernel):
    info = np.finfo(dtype)
    rng = np.random.default_rng(0)
    lo, hi = np.log(info.tiny), np.log(info.max)
    x = np.concatenate([rng.uniform(lo, hi, 400_000), rng.uniform(-1, 1, 100_000), rng.uniform(-1e-6, 1e-6, 10_000),
                        np.linspace(lo, hi, 10_001), [0.0, -0.0, lo, hi]]).astype(dtype)
    got = _exp(x, kernel).astype(np.float64)
    # float32: float64's exp is exact to the last float32 bit. float64: numpy's own exp is
    # within 0.5 ulp, so ours within 1 ulp of the true value is within 1.5 ulp of numpy's.
    want = np.exp(x.astype(np.float64))
    normal = want <= float(info.max)  # log(max) rounded to the dtype may lie just above it
    got, want = got[normal], want[normal]
    bound = (1.0 if dtype == np.float32 else 1.5) * float(info.eps)
    assert np.max(np.abs(got - want) / want) <= bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subnormal_results_and_underflow(dtype):
    info = np.finfo(dtype)
    lo = np.log(info.tiny)
    x = np.linspace(lo - 20, lo, 20_001).astype(dtype)
    got = _exp(x).astype(np.float64)
    want = np.exp(x).astype(np.float64)  # numpy's subnormals: rounded once
    assert np.max(np.abs(got - want)) <= float(info.smallest_subnormal)
    assert _exp(np.array([lo - 40, -1e30, -np.inf], dtype=dtype)).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values(dtype):
    info = np.finfo(dtype)
    got = _exp(np.array([np.inf, np.log(info.max) * 1.001, 1e30, np.nan, 0.0], dtype=dtype))
    assert np.isinf(got[0]) and np.isinf(got[1]) and np.isinf(got[2]) and got[0] > 0
    assert np.isnan(got[3])
    assert got[4] == 1.0
    assert got.dtype == dtype


def test_complex_falls_back_to_numpy():
    z = np.array([0.3 + 1.2j, -2.0 - 0.5j], dtype=np.complex128)
    np.testing.assert_allclose(_exp(z), np.exp(z), rtol=1e-15)


def test_plain_python_is_numpy():
    assert fast_exp(np.float32(1.5)) == np.exp(np.float32(1.5))


@njit(cache=False, error_model="numpy")
def _gates(x, sig, tanh):
    for i in range(x.size):
        sig[i] = fast_sigmoid(x[i])
        tanh[i] = fast_tanh(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_tanh_match_numpy(dtype):
    x = np.concatenate([np.linspace(-60, 60, 100_001), [0.0, 1e-30, -1e-30, 200.0, -200.0, np.inf, -np.inf]]).astype(dtype)
    sig, tanh = np.empty_like(x), np.empty_like(x)
    _gates(x, sig, tanh)
    x64 = x.astype(np.float64)
    eps = float(np.finfo(dtype).eps)
    with np.errstate(over="ignore"):
        want_sig = (1 / (1 + np.exp(-x64))).astype(dtype).astype(np.float64)  # rounded to the dtype
    np.testing.assert_allclose(sig, want_sig, rtol=3 * eps, atol=float(np.finfo(dtype).tiny))
    np.testing.assert_allclose(tanh, np.tanh(x64), rtol=4 * eps, atol=2 * eps)  # absolute near 0
    assert sig[-2] == 1.0 and sig[-1] == 0.0 and tanh[-2] == 1.0 and tanh[-1] == -1.0
    nan = np.array([np.nan], dtype=dtype)
    _gates(nan, sig[:1], tanh[:1])
    assert np.isnan(sig[0]) and np.isnan(tanh[0])
