"""The per-use LoRA linear: W + B_k A_k with the active adapter k, the plain (B = 0) and SVD inits, and
``add_lora`` on real mixers (those that call their Linear and those that read its weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recur
from recur.models.lora import LoRALinear, add_lora, lora_linears, set_adapter


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _lora(n_in=6, n_out=5, adapters=3, rank=2, bias=True):
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(n_in, n_out, bias=bias), adapters, rank)


def test_forward_is_the_shared_weight_plus_the_active_adapter():
    lora = _lora()
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 7, 6)
    for k in range(3):
        set_adapter(lora, k)
        w = lora.base.weight + lora.lora_B[k] @ lora.lora_A[k]
        torch.testing.assert_close(lora(x), F.linear(x, w, lora.base.bias), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lora.weight, w, rtol=0, atol=0)  # what a mixer reading .weight sees
    set_adapter(lora, 0)
    y0 = lora(x)
    set_adapter(lora, 2)
    assert (lora(x) - y0).abs().max() > 1e-3  # the adapters differ


def test_random_init_starts_at_the_shared_weight():
    lora = _lora()
    assert torch.count_nonzero(lora.lora_B) == 0 and torch.count_nonzero(lora.lora_A) == lora.lora_A.numel()
    x = torch.randn(3, 6)
    for k in range(3):
        set_adapter(lora, k)
        torch.testing.assert_close(lora(x), lora.base(x), rtol=0, atol=0)


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_svd_init_is_the_best_rank_r_approximation_of_the_target(rank):
    lora = _lora(n_in=6, n_out=5, adapters=2, rank=rank)
    target = torch.randn(5, 6)
    lora.init_svd(1, target)
    set_adapter(lora, 1)
    err = torch.linalg.matrix_norm(lora.weight - target)
    s = torch.linalg.svdvals(target - lora.base.weight)
    # Eckart-Young: the error of the best rank-r approximation is the norm of the dropped singular values
    torch.testing.assert_close(err, s[rank:].square().sum().sqrt(), rtol=1e-10, atol=1e-10)
    if rank == 5:
        torch.testing.assert_close(lora.weight, target, rtol=1e-12, atol=1e-12)
    set_adapter(lora, 0)
    assert torch.count_nonzero(lora.lora_B[0]) == 0  # the other adapter is untouched


def test_rank_above_the_matrix_is_clipped_and_bad_values_are_errors():
    assert _lora(n_in=6, n_out=4, rank=100).rank == 4
    with pytest.raises(ValueError, match="lora_rank"):
        _lora(rank=0)
    with pytest.raises(ValueError, match="n_adapters"):
        _lora(adapters=0)
    with pytest.raises(IndexError, match="adapter 3"):
        set_adapter(_lora(), 3)
    with pytest.raises(ValueError, match="shape"):
        _lora().init_svd(0, torch.zeros(6, 5))


def test_add_lora_wraps_every_linear_keeping_its_weight_object():
    torch.manual_seed(0)
    mixer = recur.build("gla", d_model=16)
    weights = {n: m.weight for n, m in mixer.named_modules() if isinstance(m, nn.Linear)}
    names = add_lora(mixer, n_adapters=2, rank=3)
    assert sorted(names) == sorted(weights)
    wrapped = dict(lora_linears(mixer))
    assert sorted(wrapped) == sorted(weights)
    assert all(wrapped[n].base.weight is weights[n] for n in names)
    assert not [m for m in mixer.modules() if type(m) is nn.Linear and not any(m is w.base for w in wrapped.values())]


def _plain_copy_with_adapted_weights(mixer: nn.Module) -> nn.Module:
    """The mixer with each LoRALinear replaced by a plain Linear holding W + B_k A_k (the reference)."""
    import copy

    ref = copy.deepcopy(mixer)
    for name, lora in lora_linears(ref):
        plain = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(lora.weight)
            if lora.bias is not None:
                plain.bias.copy_(lora.bias)
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, plain)
    return ref


@pytest.mark.parametrize("name", ["gla", "attention", "hgrn", "s4d"])
def test_the_adapter_applies_whether_a_mixer_calls_its_linear_or_reads_its_weight(name):
    """gla and attention call their projections; hgrn and s4d read ``proj.weight`` into F.linear."""
    torch.manual_seed(0)
    mixer = recur.build(name, d_model=16).double()
    add_lora(mixer, n_adapters=2, rank=2)
    with torch.no_grad():
        for _, lora in lora_linears(mixer):
            lora.lora_B.normal_(0.0, 0.3)
    set_adapter(mixer, 1)
    x = torch.randn(2, 9, 16)
    y, _ = mixer(x)
    y_ref, _ = _plain_copy_with_adapted_weights(mixer)(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    set_adapter(mixer, 0)
    assert (mixer(x)[0] - y).abs().max() > 1e-4


class _Aliasing(nn.Module):
    """A module computing with its Linear's weight under another name (the adapter would be bypassed)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.w = self.proj.weight


def test_a_linear_whose_weight_is_used_elsewhere_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Linear 'proj' is also used as 'w'"):
        add_lora(_Aliasing(), n_adapters=2, rank=1, owner="test")
