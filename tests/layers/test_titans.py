"""Titans (titans, titans_mac, titans_mag, titans_mal): the properties of each architecture that the
conformance suite cannot know. MAC attends over [persistent tokens; memory reads; segment] and
gates its attention output with the memory's read of it; MAG gates sliding-window attention with
the memory; MAL is the memory layer followed by attention. Exactness checks run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

import recur
from recur import CausalLM, State
from recur.layers.titans import prefix_window_attention

from .helpers import D, close, make, randn


def capture_input(module, store):
    return module.register_forward_hook(lambda mod, args, out: store.append(args[0]))


def heads(t):
    return rearrange(t, "b t (h d) -> b h t d", h=2)


# ---------------------------------------------------------------------------------- MAC
def test_mac_first_token_attends_to_persistent_tokens_its_memory_read_and_itself():
    """Eqs. 21-23 at the first token: y_1 = Attn(q(x_1); [p_1..p_Np, h_1, x_1]), h_1 = M_0(q_mem(x_1))."""
    mac = make("titans_mac", n_persistent=3)
    x = randn(2, 1, D)
    ys = []
    hook = capture_input(mac.attn_norm, ys)
    mac(x)
    hook.remove()
    state = mac.init_state(2, dtype=torch.float64)
    q_mem, _ = mac.memory.queries(x, state["conv_x"])
    h = rearrange(mac.memory.read([state[f"seg_W{i}"] for i in range(2)], q_mem), "b h t d -> b t (h d)")
    attn = mac.attention  # rotary at position 0 is the identity
    pk, pv = attn.persistent_kv(2)
    keys = torch.cat([pk, heads(attn.k_proj(h)), heads(attn.k_proj(x))], dim=2)  # [p; h_1; x_1]
    values = torch.cat([pv, heads(attn.v_proj(h)), heads(attn.v_proj(x))], dim=2)
    scores = heads(attn.q_proj(x)) @ keys.transpose(-1, -2) / math.sqrt(mac.head_dim)
    expected = torch.softmax(scores, dim=-1) @ values
    assert keys.shape[2] == 3 + 2
    close(ys[0], expected, "attention output of the first token")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_mac_output_is_y_gated_by_the_memory_read_of_y(mode):
    """Eqs. 24-25: the memory learns from the attention outputs y and o = W_O(N(y) * sigmoid(N(M_t(y))))."""
    mac = make("titans_mac", mode=mode, segment_size=5, chunk_size=3)
    x = randn(2, 12, D, seed=2)
    ys, reads = [], []
    hooks = [capture_input(mac.attn_norm, ys), capture_input(mac.mem_norm, reads)]
    out, _ = mac(x)
    for h in hooks:
        h.remove()
    y, r = torch.cat(ys, dim=2), torch.cat(reads, dim=2)  # per head, every piece of every segment
    expected = mac.o_proj(rearrange(mac.attn_norm(y) * torch.sigmoid(mac.mem_norm(r)), "b h t d -> b t (h d)"))
    close(out, expected, "output gate")
    state = mac.init_state(2, dtype=torch.float64)["memory"]
    r_again, _ = mac.memory(rearrange(y, "b h t d -> b t (h d)"), state, mac.op_mode, mac.chunk_size)
    close(r, r_again, "the memory's reads are those of the memory trained on y alone")


def test_mac_reads_the_memory_as_the_segment_began():
    """h of segment 2 comes from the memory after segment 1 (eq. 21's M*_{t-1}), not the evolving one."""
    mac = make("titans_mac", segment_size=4, chunk_size=3)
    x = randn(1, 8, D, seed=3)
    used = []
    read = mac.memory.read
    mac.memory.read = lambda weights, q: used.append([w.clone() for w in weights]) or read(weights, q)
    mac(x)
    mac.memory.read = read
    assert len(used) == 2, "one read per segment"
    _, after_first = mac(x[:, :4])
    for i in range(2):
        close(used[0][i], mac.init_state(1, dtype=torch.float64)[f"seg_W{i}"], f"segment 1 reads M_0 (layer {i})")
        close(used[1][i], after_first["memory"][f"W{i}"], f"segment 2 reads the memory after segment 1 (layer {i})")
        close(after_first[f"seg_W{i}"], after_first["memory"][f"W{i}"], "the state keeps it")


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 22), min_size=1, max_size=4, unique=True), mode=st.sampled_from(["chunk", "recurrent"]))
def test_mac_state_carry_is_exact_when_segments_and_minibatches_do_not_align(cuts, mode):
    mac = make("titans_mac", mode=mode, segment_size=6, chunk_size=4)
    x = randn(2, 23, D, seed=4)
    y, s = mac(x)
    ys, state = [], None
    for lo, hi in zip([0, *sorted(cuts)], [*sorted(cuts), 23]):
        yy, state = mac(x[:, lo:hi], state)
        ys.append(yy)
    close(torch.cat(ys, 1), y, f"output after splits {sorted(cuts)}")
    for (name, a), (_, b) in zip(state.tensors(), s.tensors()):
        if a.is_floating_point():
            close(a, b, f"state entry {name}")
        else:
            assert torch.equal(a, b), name
    if mode == "chunk":
        mac.mode = "recurrent"
        close(mac(x)[0], y, "chunk vs recurrent")


def test_mac_rows_at_different_segment_positions():
    mac = make("titans_mac", segment_size=5, chunk_size=3)
    x, more = randn(2, 7, D, seed=5), randn(2, 6, D, seed=6)
    _, s_a = mac(x[:1, :3])
    _, s_b = mac(x[1:, :7])
    mixed = State.cat([s_a, s_b])  # one row 3 tokens into its segment, the other 2
    y, _ = mac(more, mixed)
    close(y[:1], mac(more[:1], s_a)[0], "row 0")
    close(y[1:], mac(more[1:], s_b)[0], "row 1")


# ---------------------------------------------------------------------------------- MAG
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_mag_gates_sliding_window_attention_with_the_memory(mode):
    """Eq. 28: o = W_O(N(y) * sigmoid(N(M(x)))), y = SW-Attn*(x), both branches on the same input."""
    mag = make("titans_mag", mode=mode, window=4, chunk_size=3)
    x = randn(2, 11, D, seed=7)
    state = mag.init_state(2, dtype=torch.float64)
    y, *_ = mag.attention(x, state["pos"], state["k"], state["v"], mag.window, mode)
    m, _ = mag.memory(x, state["memory"], mag.op_mode, mag.chunk_size)
    assert y.shape == (2, 11, mag.n_heads * mag.head_dim), "attention branch: [batch, time, heads * head_dim]"
    assert m.shape == (2, mag.n_heads, 11, mag.head_dim), "memory branch: [batch, heads, time, head_dim]"
    gate = torch.sigmoid(mag.mem_norm(m))
    assert gate.shape == m.shape and bool(((gate > 0) & (gate < 1)).all()), "a per-channel gate in (0, 1)"
    expected = mag.o_proj(rearrange(mag.attn_norm(heads(y)) * gate, "b h t d -> b t (h d)"))
    close(mag(x)[0], expected, "output")


def reference_prefix_window(q, k, v, pk, pv, window):
    T, S = q.shape[2], k.shape[2]
    outs = []
    for i in range(T):
        a = S - T + i
        keys = torch.cat([pk, k[:, :, max(0, a - window + 1) : a + 1]], dim=2)
        values = torch.cat([pv, v[:, :, max(0, a - window + 1) : a + 1]], dim=2)
        p = torch.softmax(q[:, :, i : i + 1] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        outs.append(p @ values)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("block", [1, 3, 256])
@pytest.mark.parametrize("cached", [0, 2, 5])
def test_persistent_prefix_is_visible_to_every_query_of_the_window(block, cached):
    q, k, v = randn(2, 2, 9, 4, seed=8), randn(2, 2, 9 + cached, 4, seed=9), randn(2, 2, 9 + cached, 4, seed=10)
    pk, pv = randn(2, 2, 3, 4, seed=11), randn(2, 2, 3, 4, seed=12)
    out = prefix_window_attention(q, k, v, pk, pv, window=3, scale=0.5, block=block)
    close(out, reference_prefix_window(q, k, v, pk, pv, 3), "prefix + window attention")


def test_mag_persistent_tokens_matter_long_after_the_window():
    mag = make("titans_mag", window=3)
    x = randn(1, 20, D, seed=13)
    y, _ = mag(x)
    with torch.no_grad():
        mag.attention.persistent.add_(1.0)
    y2, _ = mag(x)
    assert (y2[:, -1] - y[:, -1]).abs().max() > 1e-3, "the last token (17 tokens past the window) sees the prefix"


# ---------------------------------------------------------------------------------- MAL
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_mal_is_the_memory_layer_then_attention(mode):
    """Eqs. 30-31: o = SW-Attn(M(x)); the other order differs."""
    mal = make("titans_mal", mode=mode, window=4, chunk_size=3)
    x = randn(2, 10, D, seed=14)
    state = mal.init_state(2, dtype=torch.float64)
    y, _ = mal.layer(x, state["memory"], mal.op_mode, mal.chunk_size)
    o, *_ = mal.attention(y, state["pos"], state["k"], state["v"], mal.window, mode)
    close(mal(x)[0], o, "memory then attention")
    a, *_ = mal.attention(x, state["pos"], state["k"], state["v"], mal.window, mode)
    swapped, _ = mal.layer(a, state["memory"], mal.op_mode, mal.chunk_size)
    assert not torch.allclose(swapped, o), "attention then memory is a different layer"


# -------------------------------------------------------------------------- all of them
@pytest.mark.parametrize("name", ["titans", "titans_mac", "titans_mag", "titans_mal"])
def test_the_initial_memory_is_learned(name):
    """init_state holds the learned M_0 (anchor = weights, zero momentum); the outer loop trains it."""
    mixer = make(name)
    memory = mixer.memory if hasattr(mixer, "memory") else mixer.layer.memory
    state = mixer.init_state(3, dtype=torch.float64)
    mem_state = state if name == "titans" else state["memory"]
    for i, w in enumerate(memory.init_weights):
        assert torch.equal(mem_state[f"W{i}"], w.expand(3, *w.shape)) and torch.equal(mem_state[f"A{i}"], mem_state[f"W{i}"])
        assert not mem_state[f"S{i}"].any()
    y, _ = mixer(randn(2, 9, D))
    y.square().sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in memory.init_weights)
    assert memory.norm_gain.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["titans", "titans_mac", "titans_mag", "titans_mal"])
def test_gates_start_at_their_initial_values(name):
    """theta, eta, alpha = sigmoid(x W + b) start (at x = 0) at the requested values, per head."""
    torch.manual_seed(0)
    mixer = recur.build(name, d_model=D, lr_init=0.1, momentum_init=0.8, decay_init=0.02)  # float32 parameters
    memory = mixer.memory if hasattr(mixer, "memory") else mixer.layer.memory
    H = mixer.n_heads
    expected = torch.tensor([0.1] * H + [0.8] * H + [0.02] * H)
    torch.testing.assert_close(torch.sigmoid(memory.gate_proj.bias.detach()), expected)  # float32 tolerance
    with pytest.raises(ValueError, match="lr_init"):
        recur.build(name, d_model=D, lr_init=1.0)


def test_causal_lm_with_titans_mac_trains_and_generates():
    torch.manual_seed(0)
    lm = CausalLM(vocab_size=32, d_model=32, n_layers=2, pattern="titans_mac").double()
    tokens = torch.randint(0, 32, (4, 24), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        logits, _ = lm(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"training does not reduce the loss: {losses}"
    prompt = tokens[:2, :5]
    out = lm.generate(prompt, 7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt) and int(out.max()) < 32
    seq = prompt
    for _ in range(7):  # streamed generation equals recomputation from scratch
        seq = torch.cat([seq, lm(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
