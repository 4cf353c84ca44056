"""The on/off switch of the compiled CPU kernels (numba), and the helpers they share.

Each op whose inner loop PyTorch cannot run at memory speed on CPU has its compiled kernels
beside it, with PyTorch autograd Functions around them:

* ``recur.ops.scan_kernels``: the diagonal scan h_t = exp(log_a_t) h_{t-1} + b_t (flat and
  grouped decays), behind ``recur.ops.scan.diagonal_scan``'s chunk mode;
* ``recur.ops.selective_kernels``: Mamba's selective scan with its output contraction;
* ``recur.ops.delta_kernels``: the delta rule's chunk form (unit lower-triangular solves, the
  chunk masks and decays, the per-position input scalings);
* ``recur.ops.gated_kernels``: GLA's factored chunk decays;
* ``recur.ops.cells_kernels``: the gate arithmetic of one LSTM or GRU step.

Every ``exp`` in them is ``recur.ops.numba_math.fast_exp``, which LLVM vectorises (numba's own
``np.exp`` is a scalar libm call per element).

Each op runs its kernels for CPU tensors when numba is installed (it is a dependency of the
package) and this module's switch is on; ``RECUR_COMPILED=0`` in the environment, or
``set_enabled(False)``, turns every kernel off at once and each op falls back to its PyTorch
path (what CUDA runs). Both paths are tested against the reference loops in float64.

Shared here: the switch and the predicate ``can_real``, the work partition of the parallel
kernels (``_block`` channels per work item, ``_work_item`` to locate one), the thread count
(``_set_threads``) and ``_dense`` for incoming gradients that autograd passed as None.
"""

from __future__ import annotations

import os

import torch

try:  # numba is a declared dependency; the PyTorch path remains the device-agnostic fallback
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None

_ENABLED = os.environ.get("RECUR_COMPILED", "1") not in ("0", "false", "False")


def set_enabled(flag: bool) -> None:
    """Turn the compiled kernels on or off (off: every op uses its PyTorch path)."""
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    """True if the compiled kernels may run. Never while ``torch.compile`` traces: a numba kernel
    is opaque to it, so a compiled graph takes the PyTorch twins (held equal to the kernels by
    the tests), which it can trace and fuse, with no graph break."""
    return _ENABLED and numba is not None and not torch.compiler.is_compiling()


def can_real(t: torch.Tensor) -> bool:
    """True if the compiled kernels handle t: kernels on, a CPU tensor, float32 or float64."""
    return enabled() and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _dense(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An incoming gradient as a contiguous array for a kernel; zeros where autograd passed None."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


if numba is not None:

    @njit(cache=True)
    def _work_item(job, n_blocks, block, groups, rep):  # pragma: no cover - compiled
        """(row, first and last group, first and last channel) of work item ``job`` when each
        row's ``groups`` groups of ``rep`` channels are cut into runs of ``block`` groups."""
        row = job // n_blocks
        g0 = (job % n_blocks) * block
        g1 = min(groups, g0 + block)
        return row, g0, g1, g0 * rep, g1 * rep


def _block(rows: int, channels: int, cap: int | None = None) -> int:
    """Channels per work item: whole rows when there are enough rows to keep every thread busy
    (each item then streams through contiguous memory, which the prefetcher keeps at memory
    speed: measured 12 ms against 42 ms for 256-channel blocks at [8, 4096, 1024]), otherwise
    rows split into as many equal runs (multiples of 16) as the threads need; at most ``cap``."""
    split = -(-numba.get_num_threads() // rows)
    per_item = max(1, channels)
    if split > 1:
        per_item = -(-channels // split)
        per_item = -(-per_item // 16) * 16
    return per_item if cap is None else min(per_item, cap)


def _set_threads() -> None:
    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != n:
        # numba's OpenMP pool, started on its first use, calls omp_set_num_threads(NUMBA_NUM_THREADS),
        # which can resolve to torch's libgomp: torch.set_num_threads(1) silently became 2 (measured).
        torch.set_num_threads(n)
