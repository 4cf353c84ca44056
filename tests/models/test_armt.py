"""armt: DPFP and the associative write by hand in float64 (a block delta rule; one write token is
one step of recur.ops.delta.delta_rule), the per-layer read / write of the model by hand, the state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recur.models.armt import ARMT, EPS, associative_read, associative_write, dpfp
from recur.ops.delta import delta_rule

V, D, L, M = 11, 16, 5, 3


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit_features(*shape, seed=0):
    return F.normalize(dpfp(randn(*shape, seed=seed)), dim=-1)


def test_dpfp_is_products_of_rolled_relu_pairs():
    x = randn(3, 4)
    p = torch.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=-1)  # 8 features
    want = torch.stack([torch.stack([p[:, i] * p[:, (i - j) % 8] for i in range(8)], dim=-1) for j in (1, 2, 3)], 1)
    torch.testing.assert_close(dpfp(x, 3), want.reshape(3, 24), rtol=0, atol=0)
    assert (dpfp(x, 2) >= 0).all() and dpfp(x, 2).shape == (3, 16)


def test_the_write_is_a_block_delta_rule_by_hand():
    """Every write token reads the same (A, z): A += sum_i beta_i k_i (v_i - A^T k_i / (k_i.z + eps))^T,
    z += sum_i clip(1 - k_i.z / |k_i|^2, 0, 1) k_i, in float64 against a loop over tokens."""
    B, H, dk, dv = 2, 2, 12, 3
    k, v, beta = unit_features(B, H, M, dk // 6, seed=1), randn(B, H, M, dv, seed=2), randn(B, H, M, seed=3).sigmoid()
    A, z = randn(B, H, dk, dv, seed=4), unit_features(B, H, 2, dk // 6, seed=5).sum(2)  # a z from earlier writes
    A2, z2 = A.clone(), z.clone()
    for b in range(B):
        for h in range(H):
            for i in range(M):
                ki = k[b, h, i]
                read = A[b, h].T @ ki / (ki @ z[b, h] + EPS)
                A2[b, h] += beta[b, h, i] * torch.outer(ki, v[b, h, i] - read)
                z2[b, h] += min(max(1 - float(ki @ z[b, h]) / float(ki @ ki), 0.0), 1.0) * ki
    got_A, got_z = associative_write(k, v, beta, A, z)
    torch.testing.assert_close(got_A, A2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_z, z2, rtol=1e-12, atol=1e-12)
    _, plain = associative_write(k, v, beta, A, z, correction=False)
    torch.testing.assert_close(plain, z + k.sum(2))
    q = unit_features(B, H, 4, dk // 6, seed=6)
    torch.testing.assert_close(associative_read(q, A, z), (q @ A) / ((q @ z[..., None]) + EPS))


def test_one_write_token_is_one_step_of_the_delta_rule_primitive():
    """M = 1: A' = (I - b k k^T) A + b k v'^T with b = beta / (k.z + eps), v' = (k.z + eps) v."""
    B, H, dk, dv = 2, 1, 18, 4
    k, v, beta = unit_features(B, H, 1, 3, seed=7), randn(B, H, 1, dv, seed=8), randn(B, H, 1, seed=9).sigmoid()
    A, z = randn(B, H, dk, dv, seed=10), unit_features(B, H, 3, 3, seed=11).sum(2)
    d = (k[:, :, 0] * z).sum(-1)[..., None] + EPS  # [B, H, 1]
    _, S = delta_rule(k, k, v * d[..., None], beta / d, S0=A, mode="reference")
    torch.testing.assert_close(associative_write(k, v, beta, A, z)[0], S, rtol=1e-12, atol=1e-12)


def test_the_model_reads_before_and_writes_after_every_layer_by_hand():
    torch.manual_seed(0)
    model = ARMT(V, D, 2, segment_len=L, n_memory=M, d_mem=4, memory_heads=2).double()
    for a in model.associative:
        torch.nn.init.normal_(a.W_v.weight, std=0.3)
    x = torch.randint(V, (2, 2 * L + 2), generator=torch.Generator().manual_seed(1))
    e = model.embed(x)
    mem = model.memory.expand(2, M, D)
    memory = [(torch.zeros(2, 2, 12, 8, dtype=torch.float64), torch.zeros(2, 2, 12, dtype=torch.float64))] * 2

    def heads(t):  # [b, t, (h d)] -> [b, h, t, d]
        return t.view(t.shape[0], t.shape[1], 2, -1).transpose(1, 2)

    logits = []
    for seg in (e[:, :L], e[:, L:2 * L], e[:, 2 * L:]):
        write = seg.shape[1] == L
        h = torch.cat([seg, mem], dim=1) if write else seg
        for i, (block, a) in enumerate(zip(model.backbone.layers, model.associative)):
            A, z = memory[i]
            q = F.normalize(dpfp(heads(a.W_q(h))), dim=-1)
            h = h + ((q @ A) / ((q @ z[..., None]) + EPS)).transpose(1, 2).reshape(h.shape)
            h, _, _ = block(h)
            if write:
                m = h[:, L:]
                k = F.normalize(dpfp(heads(a.W_k(m))), dim=-1)
                beta = torch.sigmoid(a.W_b(m)).transpose(1, 2)
                memory[i] = associative_write(k, heads(a.W_v(m)), beta, A, z)
        logits.append(model.head(model.norm(h[:, :seg.shape[1]])))
    out = model(x)
    torch.testing.assert_close(out.logits, torch.cat(logits, dim=1), rtol=1e-12, atol=1e-12)
    for i in range(2):
        torch.testing.assert_close(out.state["memory"][f"layer{i}"]["A"], memory[i][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.state["memory"][f"layer{i}"]["z"], memory[i][1], rtol=1e-12, atol=1e-12)


def test_the_first_segment_is_the_plain_transformer_and_w_v_starts_silent():
    """A = z = 0 before the first write: the first segment's read adds exactly nothing; with W_v at
    its zero initialisation the memory stays silent (A = 0) however long the input."""
    torch.manual_seed(0)
    model = ARMT(V, D, 2, segment_len=L, n_memory=M).double()
    x = torch.randint(V, (2, 4 * L), generator=torch.Generator().manual_seed(2))
    h, _ = model.backbone(model.embed(x[:, :L]))
    out = model(x)
    # (the model's pass also holds the write tokens, after: equal up to summation order)
    torch.testing.assert_close(out.logits[:, :L], model.head(model.norm(h)), rtol=1e-12, atol=1e-12)
    assert all((out.state["memory"][f"layer{i}"]["A"] == 0).all() for i in range(2))
    assert (out.state["memory"]["layer0"]["z"] > 0).any()


def test_state_size_is_the_matrices_and_the_pending_segment():
    model = ARMT(V, 32, 3, segment_len=L, n_memory=M, d_mem=8, memory_heads=2, dpfp_nu=2)
    d_key = 2 * 2 * 8
    assert model.state_size(10 ** 6) == 3 * (d_key * 32 // 2 + d_key) + (L - 1) * 32
    assert model(torch.zeros(1, 7, dtype=torch.long)).state.num_floats() == model.state_size(7)
    assert ARMT(V, 64, 1).associative[0].d_key == 2 * 3 * 32  # d_mem defaults to d_model // 2


@pytest.mark.parametrize("options, phrase", [(dict(memory_heads=3), "memory_heads"), (dict(d_mem=0), "d_mem"),
                                             (dict(dpfp_nu=0), "dpfp_nu"), (dict(n_memory=0), "n_memory")])
def test_bad_options_are_named(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        ARMT(V, D, 1, **options)


@pytest.mark.slow
def test_armt_learns_associative_retrieval_and_generalises_to_twice_the_pairs():
    """The paper's probe at lab scale (2 layers, d 64, M 4, one pair per segment): 3 pairs learnt
    to exact match in 1500 steps, and 6 pairs (twice the segments) retrieved as well (measured:
    1.0 and 1.0; about 2 minutes on 2 cores)."""
    from recur.config import RunConfig
    from recur.training.trainer import train

    cfg = {"task": {"name": "associative_retrieval", "args": {"key_size": 1}, "seq_len": 16},
           "model": {"arch": "armt", "mixer": "attention", "d_model": 64, "n_layers": 2,
                     "args": {"segment_len": 4, "n_memory": 4}},
           "optim": {"steps": 1500, "batch_size": 32, "lr": 1e-3, "early_stop": None},
           "eval": {"lengths": [16, 28], "batches": 8}, "device": "cpu"}
    metrics = train(RunConfig.model_validate(cfg), progress=False).metrics
    assert metrics["16"]["exact_match"] >= 0.95 and metrics["28"]["exact_match"] >= 0.9, metrics
