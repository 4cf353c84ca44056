"""The architecture conformance suite (docs/design.md section 5), parametrized over the registry.

Every registered architecture is built by its ``example(vocab_size, d_model)`` (small, with fast
modes and chunks that T=23 ends inside) and must pass the mixer suite's properties at the model
level: the ModelOutput protocol, float64 equality of its fast path and its sequential reference
(forward and gradients), state carry at odd splits, token-by-token stepping, batch independence,
causality where it is autoregressive, state_size equal to the floats held, its own loss with a
gradient into every parameter, and a clear error for a wrong state. A newly registered
architecture is tested with no new test code.
"""

from __future__ import annotations

import pytest
import torch

import recur
from recur import ARCHITECTURES, ModelOutput, State
from recur.tasks.base import Batch

V, D, B, T = 11, 16, 2, 23
RTOL, ATOL = 1e-8, 1e-10  # float64: modes differ by summation order only (~1e-14)
ARCHS = ARCHITECTURES.names()
SPLITS = (1, 7, 16, 22)  # odd points, inside chunks and at a chunk edge (chunk_size 8)


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = ARCHITECTURES.get(name).cls.example(vocab_size=V, d_model=D).double()
    for m in model.mixers:
        if hasattr(m, "chunk_size"):
            m.chunk_size = 8
    return model


def tokens(seed: int = 1, b: int = B, t: int = T) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def per_position(out: ModelOutput) -> bool:
    return out.logits.ndim == 3


def joined(outs: list[ModelOutput]) -> torch.Tensor:
    """What a sequence of calls predicts: per-position logits concatenated, or the last call's
    sequence-level logits (a pooled head summarises everything read so far)."""
    return torch.cat([o.logits for o in outs], dim=1) if per_position(outs[-1]) else outs[-1].logits


def test_every_architecture_is_registered_and_documented():
    assert {"causal_lm", "looped_lm", "encoder"} <= set(ARCHS)
    for name in ARCHS:
        d = ARCHITECTURES.describe(name)
        assert d["paper"] and d["description"] and issubclass(ARCHITECTURES.get(name).cls, recur.Architecture)


@pytest.mark.parametrize("name", ARCHS)
def test_output_protocol_and_shapes(name):
    model = make(name)
    out = model(tokens())
    assert isinstance(out, ModelOutput) and isinstance(out.state, State) and isinstance(out.aux, dict)
    logits, state = out  # unpacks as (logits, state)
    assert logits.dtype == torch.float64 and logits.shape[0] == B and logits.shape[-1] >= 2
    assert logits.shape in ((B, T, logits.shape[-1]), (B, logits.shape[-1]))
    one = model(tokens(t=1))
    assert one.logits.shape[0] == B  # T = 1 is an input like any other


@pytest.mark.parametrize("name", ARCHS)
def test_fast_path_equals_sequential_reference_forward_and_gradients(name):
    fast, ref = make(name), make(name)
    ref.set_mode("recurrent")
    assert any(m.mode != "recurrent" for m in fast.mixers), "the example must exercise a fast mode"
    x = tokens()
    a, b = fast(x), ref(x)
    close(a.logits, b.logits, "logits")
    g = torch.randn(a.logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (a.logits * g).sum().backward()
    (b.logits * g).sum().backward()
    for (n, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, f"no gradient reaches {n}"
        close(p.grad, q.grad, f"gradient of {n}")


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("split", SPLITS)
def test_state_carry_at_odd_splits_is_exact(name, split):
    model = make(name)
    x = tokens()
    whole = model(x)
    first = model(x[:, :split])
    second = model(x[:, split:], first.state)
    close(joined([first, second]), joined([whole]), f"carry at {split}")
    for (k, s), (_, w) in zip(second.state.tensors(), whole.state.tensors()):
        if s.is_floating_point():
            close(s, w, f"state entry {k}")
        else:
            assert torch.equal(s, w), f"state entry {k}"


@pytest.mark.parametrize("name", ARCHS)
def test_stepping_token_by_token_equals_one_call(name):
    model = make(name)
    x = tokens(t=9)
    state, outs = None, []
    for t in range(x.shape[1]):
        out = model(x[:, t:t + 1], state)
        outs.append(out)
        state = out.state
    close(joined(outs), joined([model(x)]), "stepping")


@pytest.mark.parametrize("name", ARCHS)
def test_explicit_initial_state_equals_none(name):
    model = make(name)
    x = tokens()
    close(model(x, model.init_state(B)).logits, model(x).logits, "init_state")


@pytest.mark.parametrize("name", ARCHS)
def test_batch_rows_are_independent(name):
    model = make(name)
    x = tokens()
    y = x.clone()
    y[1] = (y[1] + 1) % V
    close(model(x).logits[0], model(y).logits[0], "row 0 after changing row 1")


@pytest.mark.parametrize("name", [n for n in ARCHS if ARCHITECTURES.get(n).cls.autoregressive])
def test_autoregressive_models_are_causal_and_generate_by_stepping(name):
    model = make(name)
    x = tokens()
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 3) % V
    close(model(x).logits[:, :12], model(y).logits[:, :12], "causality")
    out = model.generate(x[:, :5], max_new_tokens=4)
    seq = x[:, :5]
    for _ in range(4):  # greedy, recomputed from scratch each token
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("name", ARCHS)
def test_state_size_counts_the_floats_held(name):
    model = make(name)
    state = model(tokens()).state
    assert model.state_size(T) == state.num_floats()


@pytest.mark.parametrize("name", ARCHS)
def test_loss_is_the_heads_and_reaches_every_parameter(name):
    model = make(name)
    x = tokens()
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, -1] = True  # one supervised position per row: every head can be trained on it
    batch = Batch(x, torch.randint(2, (B, T), generator=torch.Generator().manual_seed(5)), mask)
    out = model(x)
    loss = model.loss(out, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    scored = model.position_logits(out, batch)
    assert scored.shape[:2] == (B, T)


@pytest.mark.parametrize("name", [n for n in ARCHS if ARCHITECTURES.get(n).cls.sparse_head])
def test_the_head_at_supervised_positions_equals_the_full_head(name):
    """``positions=`` (what the Trainer passes) computes the head where the task supervises: the loss,
    its gradient, the predictions and the state equal those of the full head, in float64."""
    from recur.training.trainer import head_inputs

    model = make(name)
    x = tokens()
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(6)) < 0.3
    mask[0] = False  # a row with nothing supervised
    mask[1, 0] = mask[1, -1] = True  # the first and last positions
    batch = Batch(x, torch.randint(V, (B, T), generator=torch.Generator().manual_seed(7)), mask)
    full, picked = model(x), model(x, **head_inputs(model, batch))
    assert picked.positions is mask and picked.logits.shape == (int(mask.sum()), V)
    close(picked.logits, full.logits[mask], "logits at the supervised positions")
    for (ka, a), (kb, b) in zip(picked.state.tensors(), full.state.tensors()):
        assert ka == kb
        close(a, b, f"state {ka}")
    assert torch.equal(model.predictions(picked, batch)[mask], model.predictions(full, batch)[mask])
    grads = []
    for out in (full, model(x, **head_inputs(model, batch))):
        model.zero_grad()
        model.loss(out, batch).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    close(model.loss(picked, batch), model.loss(full, batch), "loss")
    for a, b in zip(*grads):
        close(a, b, "gradient")
    with pytest.raises(ValueError, match="positions"):
        model.position_logits(picked, batch)
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=mask[:, :-1])
    other = Batch(x, batch.targets, ~mask)
    with pytest.raises(ValueError, match="other positions"):
        model.loss(picked, other)


@pytest.mark.parametrize("name", ARCHS)
def test_a_wrong_state_is_a_clear_error(name):
    model = make(name)
    with pytest.raises(ValueError, match="state"):
        model(tokens(), State(nope=torch.zeros(B, 1, dtype=torch.float64)))
    with pytest.raises((TypeError, ValueError), match="tokens"):
        model(torch.zeros(B, T))


PACKED_STARTS = [[0, 3, 8, 9, 22], [7, 16]]  # odd positions, chunk edges (8, 16), the last token; row 1 not at 0


def packed(starts=PACKED_STARTS, t: int = T) -> torch.Tensor:
    mask = torch.zeros(len(starts), t, dtype=torch.bool)
    for row, ts in enumerate(starts):
        mask[row, ts] = True
    return mask


def documents_alone(model, x, starts=PACKED_STARTS):
    """Each row's documents run separately from the zero state: per-position logits laid end to
    end, or (a sequence-level head) the last document's logits."""
    rows = []
    for row, ts in enumerate(starts):
        cuts = sorted({0, *ts, x.shape[1]})
        outs = [model(x[row:row + 1, a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        rows.append(joined(outs))
    return torch.cat(rows)


@pytest.mark.parametrize("mode", ["fast", "recurrent"])
@pytest.mark.parametrize("name", ARCHS)
def test_a_packed_batch_equals_its_documents_alone(name, mode):
    model = make(name)
    if mode == "recurrent":
        model.set_mode("recurrent")
    x = tokens()
    whole = model(x, resets=packed())
    alone = documents_alone(model, x)
    close(whole.logits, alone, "packed logits vs documents alone")
    g = torch.randn(alone.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = []
    for logits in (whole.logits, alone):
        model.zero_grad()
        (logits * g).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        close(grads[0][n], grads[1][n], f"gradient of {n}, packed vs documents alone")


@pytest.mark.parametrize("mlp", ["rwkv4", "swiglu"])
def test_packing_in_a_hybrid_with_attention_and_a_stateful_channel_mixer(mlp):
    """Attention's block-diagonal mask, a linear recurrence and RWKV's token shift in one model."""
    torch.manual_seed(0)
    model = recur.CausalLM(vocab_size=V, d_model=D, n_layers=3, pattern=["attention", "gla", "lstm"], mlp=mlp).double()
    for m in model.mixers:
        if hasattr(m, "chunk_size"):
            m.chunk_size = 8
    x = tokens()
    close(model(x, resets=packed()).logits, documents_alone(model, x), f"hybrid with {mlp}")


@pytest.mark.parametrize("name", [n for n in ARCHS if ARCHITECTURES.get(n).cls.autoregressive])
def test_left_padded_prompts_generate_what_each_prompt_alone_does(name):
    model = make(name)
    lengths = [5, 2]
    x = tokens(t=5)
    prompt, mask = x.clone(), torch.ones(2, 5, dtype=torch.long)
    prompt[1, :3], mask[1, :3] = 0, 0  # row 1: three pads, then its two tokens
    out = model.generate(prompt, max_new_tokens=4, attention_mask=mask)
    for row, n in enumerate(lengths):
        alone = model.generate(prompt[row:row + 1, 5 - n:], max_new_tokens=4)
        assert torch.equal(out[row, 5:], alone[0, n:]), f"row {row}: padded batch vs its prompt alone"
    with pytest.raises(ValueError, match="left"):
        model.generate(prompt, max_new_tokens=1, attention_mask=mask.flip(1))
