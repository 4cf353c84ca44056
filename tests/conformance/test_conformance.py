"""The conformance suite (docs/design.md section 4), parametrized over the registry.

Every registered mixer is built with its default config at ``D`` and must pass all eight
checks; a newly registered model is tested with no new test code. Exactness checks run
in float64, where the only differences between modes are summation order: relative
errors are ~1e-14, so RTOL/ATOL below leave four orders of magnitude of headroom while
still catching any real mismatch (which shows up at 1e-3 or larger).

Non-causal mixers (encoder wrappers, ``causal = False``) pass every check except two, which
check the opposite or the encoder's own contract instead: causality (y[:, :t] must depend on
x[:, t:] for some t: the mixer really reads the future) and state carry. For the latter a
non-causal mixer exposes the hook ``directions()``: a tuple of (state entry, causal mixer,
reversed) saying that entry ``key`` of the state it returns is the state ``mixer`` returns after
reading x (reversed in time if ``reversed``) from entry ``key`` of the given state.
"""

from __future__ import annotations

import pytest
import torch

import recur
from recur import State

D = 16
RTOL, ATOL = 1e-8, 1e-10
MODELS = recur.list_models()
CHUNK = 8  # small chunks so T=37 spans several chunks and ends mid-chunk
WINDOW = 6  # small attention windows so T=37 exercises eviction from a windowed cache


def make(name: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    mixer = recur.build(name, d_model=D).to(dtype)
    if hasattr(mixer, "chunk_size"):
        mixer.chunk_size = CHUNK
    if hasattr(mixer, "window"):
        mixer.window = WINDOW
    return mixer


def randn(*shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def close(a: torch.Tensor, b: torch.Tensor, what: str):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def states_close(s1: State, s2: State, what: str):
    t1, t2 = dict(s1.tensors()), dict(s2.tensors())
    assert t1.keys() == t2.keys(), f"{what}: state entries differ {sorted(t1)} vs {sorted(t2)}"
    for k in t1:
        if t1[k].is_floating_point() or t1[k].is_complex():
            close(t1[k], t2[k], f"{what}, state entry {k!r}")
        else:
            assert torch.equal(t1[k], t2[k]), f"{what}: state entry {k!r} differs"


def state_loss(state: State) -> torch.Tensor:
    """A scalar touching every floating state tensor (so gradients flow through the final state)."""
    total = 0.0
    for i, (_, t) in enumerate(state.tensors()):
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.is_floating_point() and t.numel():
            w = randn(*t.shape, dtype=t.dtype, seed=100 + i)
            total = total + (t * w).sum()
    return total


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,time", [(1, 1), (3, 1), (1, 37), (3, 37)])
def test_shapes_and_dtypes(name, dtype, batch, time):
    mixer = make(name, dtype)
    for mode in mixer.modes:
        mixer.mode = mode
        x = randn(batch, time, D, dtype=dtype)
        y, state = mixer(x)
        assert y.shape == (batch, time, D), f"mode {mode}: output shape {tuple(y.shape)}"
        assert y.dtype == dtype, f"mode {mode}: output dtype {y.dtype}"
        assert isinstance(state, State)
        assert state.batch_size == batch
        assert torch.isfinite(y).all(), f"mode {mode}: non-finite output"


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_forward(name):
    mixer = make(name, torch.float32)
    if not mixer.supports_bfloat16:
        with pytest.raises(TypeError, match="bfloat16"):
            mixer(randn(2, 9, D, dtype=torch.float32).bfloat16())
        return
    mixer = mixer.bfloat16()
    x = randn(2, 9, D, dtype=torch.float32).bfloat16()
    y, _ = mixer(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", MODELS)
def test_causality(name):
    """Causal: changing x[:, t:] leaves y[:, :t] unchanged. Non-causal (an encoder): the opposite
    for some t, so a mixer declaring causal=False really reads the future."""
    mixer = make(name)
    x = randn(2, 29, D)
    for mode in mixer.modes:
        mixer.mode = mode
        y, _ = mixer(x)
        reads_future = False
        for t in (0, 5, 17, 28):
            x2 = x.clone()
            x2[:, t:] = randn(2, 29 - t, D, seed=7 + t)
            y2, _ = mixer(x2)
            if mixer.causal:
                close(y2[:, :t], y[:, :t], f"mode {mode}: output before t={t} changed when x[:, {t}:] changed")
            elif not torch.allclose(y2[:, :t], y[:, :t], rtol=RTOL, atol=ATOL):
                reads_future = True
            if t < 28:
                assert not torch.allclose(y2[:, t:], y[:, t:]), f"mode {mode}: output ignores the input"
        if not mixer.causal:
            assert reads_future, f"mode {mode}: causal=False, but y[:, :t] never depends on x[:, t:] (declare it causal)"


@pytest.mark.parametrize("name", MODELS)
def test_modes_equal_reference_forward_and_backward(name):
    mixer = make(name)
    x0 = randn(2, 11, D, seed=3)
    _, init = mixer(x0)  # a non-trivial initial state
    init = init.detach()
    x = randn(2, 37, D, seed=4)
    weights = randn(2, 37, D, seed=5)
    params = [p for p in mixer.parameters() if p.requires_grad]

    def run(mode):
        mixer.mode = mode
        xx = x.clone().requires_grad_(True)
        y, s = mixer(xx, init)
        loss = (y * weights).sum() + state_loss(s)
        grads = torch.autograd.grad(loss, [xx, *params], allow_unused=True)
        return y.detach(), s.detach(), grads

    y_ref, s_ref, g_ref = run("recurrent")
    assert any(g is not None and g.abs().sum() > 0 for g in g_ref[1:]), "no parameter receives a gradient"
    for mode in mixer.modes:
        if mode == "recurrent":
            continue
        y, s, g = run(mode)
        close(y, y_ref, f"mode {mode} output vs reference")
        states_close(s, s_ref, f"mode {mode} final state vs reference")
        names = ["x"] + [n for n, p in mixer.named_parameters() if p.requires_grad]
        for n, a, b in zip(names, g, g_ref):
            if a is None or b is None:
                assert a is None and b is None, f"mode {mode}: gradient of {n} missing in one mode"
                continue
            close(a, b, f"mode {mode} gradient of {n} vs reference")


@pytest.mark.parametrize("name", MODELS)
def test_state_carry_is_exact(name):
    mixer = make(name)
    if not mixer.causal:
        check_encoder_state(mixer)
        return
    x = randn(2, 37, D, seed=6)
    for mode in mixer.modes:
        mixer.mode = mode
        y, s = mixer(x)
        for t in (1, 8, 20, 36):
            y1, s1 = mixer(x[:, :t])
            y2, s2 = mixer(x[:, t:], s1)
            close(torch.cat([y1, y2], dim=1), y, f"mode {mode}: split at t={t}")
            states_close(s2, s, f"mode {mode}: final state after split at t={t}")
        # token by token
        state, ys = None, []
        for t in range(x.shape[1]):
            yt, state = mixer(x[:, t : t + 1], state)
            ys.append(yt)
        close(torch.cat(ys, dim=1), y, f"mode {mode}: token-by-token stepping")
        states_close(state, s, f"mode {mode}: final state after stepping")


def check_encoder_state(mixer):
    """A non-causal mixer's state, through its ``directions()`` hook (see the module docstring):
    each entry is exactly its causal mixer's state after reading x (or x reversed) from the given
    entry, from the zero state and from a carried one (a split at several t: the directions that
    read x in order then carry exactly); the given state changes the output."""
    directions = getattr(mixer, "directions", None)
    assert callable(directions), f"{mixer.name}: a non-causal mixer must expose directions() (its state-carry hook)"
    x = randn(2, 37, D, seed=6)
    for mode in mixer.modes:
        mixer.mode = mode
        y, s = mixer(x)
        assert {key for key, _, _ in directions()} == set(s), f"mode {mode}: directions() must name every state entry"
        for key, inner, reverse in directions():
            assert inner.causal, f"{key}: a direction must be a causal mixer"
            _, expected = inner(x.flip(1) if reverse else x)
            states_close(s[key], expected, f"mode {mode}: state entry {key!r} vs its mixer after x{' reversed' if reverse else ''}")
        for t in (1, 8, 20, 36):
            _, s1 = mixer(x[:, :t])
            y2, s2 = mixer(x[:, t:], s1)
            for key, inner, reverse in directions():
                if reverse:
                    _, expected = inner(x[:, t:].flip(1), s1[key])
                    states_close(s2[key], expected, f"mode {mode}: entry {key!r} after x[:, {t}:] reversed from the carried state")
                else:
                    states_close(s2[key], s[key], f"mode {mode}: entry {key!r} carried across a split at t={t}")
            y2_fresh, _ = mixer(x[:, t:])
            assert not torch.allclose(y2, y2_fresh), f"mode {mode}: the given state does not change the output (t={t})"


@pytest.mark.parametrize("name", MODELS)
def test_state_roundtrips_through_detach_select_and_save(name, tmp_path):
    mixer = make(name)
    x = randn(3, 13, D, seed=8)
    _, s = mixer(x)
    path = tmp_path / "state.safetensors"
    s.save(path)
    states_close(State.load(path), s, "saved and loaded state")
    states_close(State.cat([s.select(i) for i in range(3)]), s, "state rebuilt from selected rows")
    y_more, _ = mixer(x, s.detach())
    y_row, _ = mixer(x[1:2], s.select(1))
    close(y_row, y_more[1:2], "continuing one selected row")


@pytest.mark.parametrize("name", MODELS)
def test_batch_independence(name):
    mixer = make(name)
    x = randn(4, 23, D, seed=9)
    for mode in mixer.modes:
        mixer.mode = mode
        y, _ = mixer(x)
        x2 = x.clone()
        x2[0] = randn(23, D, seed=10)
        y2, _ = mixer(x2)
        close(y2[1:], y[1:], f"mode {mode}: rows 1.. changed when row 0 changed")
        for i in range(4):
            yi, _ = mixer(x[i : i + 1])
            close(yi, y[i : i + 1], f"mode {mode}: row {i} alone vs in a batch")


STEPS = 100_000


@pytest.mark.parametrize("name", MODELS)
def test_long_sequence_stability(name):
    """100k steps stay finite and the state stays bounded (at most linear growth)."""
    mixer = make(name, torch.float32)
    grows = bool(mixer.growing)
    # Constant-state mixers run their recurrent (reference) mode; a KV cache runs its default
    # mode segment by segment, since its per-step cost grows with the context.
    mixer.mode = mixer.modes[0] if grows else "recurrent"
    segment = 2_000 if grows else 10_000
    state = None
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for start in range(0, STEPS, segment):
            x = torch.randn(1, segment, D, generator=g)
            y, state = mixer(x, state)
            assert torch.isfinite(y).all(), f"non-finite output before step {start + segment}"
            assert y.abs().max() < 1e4, f"output blew up before step {start + segment}"
    for key, t in state.tensors():
        if t.is_floating_point() or t.is_complex():
            assert torch.isfinite(t).all(), f"state entry {key!r} is not finite after {STEPS} steps"
            assert t.abs().max() <= 10 * STEPS, f"state entry {key!r} grew beyond linear: {t.abs().max()}"


@pytest.mark.parametrize("name", MODELS)
def test_state_size_is_honest(name):
    mixer = make(name)
    sizes = {}
    for t in (1, 5, 37):
        _, s = mixer(randn(2, t, D))
        assert s.num_floats() == mixer.state_size(t), f"T={t}: state holds {s.num_floats()} floats, state_size says {mixer.state_size(t)}"
        sizes[t] = s.num_floats()
    if not mixer.growing:
        assert len(set(sizes.values())) == 1, f"a recurrent state must not grow: {sizes}"
    assert mixer.init_state(2).num_floats() == mixer.state_size(0)


@pytest.mark.parametrize("name", MODELS)
def test_bad_input_raises_clear_errors(name):
    mixer = make(name)
    with pytest.raises(ValueError, match=f"d_model={D}"):
        mixer(randn(5, D))  # wrong rank
    with pytest.raises(ValueError, match=f"d_model={D}"):
        mixer(randn(2, 5, D + 1))  # wrong width
    with pytest.raises(TypeError, match="floating"):
        mixer(torch.ones(2, 5, D, dtype=torch.long))
    with pytest.raises(TypeError, match="State"):
        mixer(randn(2, 5, D), state={"h": torch.zeros(2, D)})
    _, s3 = mixer(randn(3, 5, D))
    with pytest.raises(ValueError, match="shape"):
        mixer(randn(2, 5, D), s3)  # state for another batch size
    with pytest.raises(TypeError, match="dtype"):
        mixer(randn(3, 5, D), s3.to(torch.float32))
    with pytest.raises(ValueError, match="modes"):
        mixer.mode = "no-such-mode"


def test_registry_lists_the_core_models():
    core = {"elman", "lstm", "gru", "mingru", "minlstm", "lru", "mamba", "linear_attention",
            "retnet", "gla", "deltanet", "gated_deltanet", "attention", "swa"}
    missing = core - set(MODELS)
    assert not missing, f"core models not registered: {sorted(missing)}"


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="'gla'"):
        recur.build("glaa", d_model=D)


def test_every_model_has_a_paper_docstring():
    for name in MODELS:
        info = recur.model_info(name)
        doc = info.cls.__doc__ or ""
        assert len(doc.strip()) > 40 and info.paper, f"{name}: docstring must state the recurrence and the paper"
