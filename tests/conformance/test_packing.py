"""Packed sequences, parametrized over the registry: a packed batch equals its documents run alone.

``mixer(x, state, resets=mask)`` resets the state to the initial state before every token where
``mask`` is True (recur.layers.packing). For every registered mixer, in every mode, in float64:
the outputs of a packed batch equal each document run separately (from the zero state, or from
the given state for a row's first document when the row does not reset at t = 0), the gradients
of the inputs and parameters equal, and the final state continues exactly like the last
document's own final state. Boundaries sit at odd positions, at the first and the last position,
at chunk edges (CHUNK = 8) and in consecutive steps.
"""

from __future__ import annotations

import pytest
import torch

from test_conformance import CHUNK, D, MODELS, close, make, randn

T = 37
# Document starts per row (row 1 does not reset at 0: its first document reads the given state).
STARTS = [[0, 3, CHUNK, CHUNK + 1, 3 * CHUNK, T - 1], [CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1], []]
MORE = 5  # tokens read after the packed batch, from its final state


def packed_mask(starts=STARTS, length=T) -> torch.Tensor:
    mask = torch.zeros(len(starts), length, dtype=torch.bool)
    for row, ts in enumerate(starts):
        mask[row, ts] = True
    return mask


def documents(row: int) -> list[tuple[int, int, bool]]:
    """(start, end, reads the given state) of each document in ``row``."""
    starts = STARTS[row]
    cuts = sorted(set([0, *starts]))
    return [(a, b, a == 0 and 0 not in starts) for a, b in zip(cuts, [*cuts[1:], T])]


def run_packed(mixer, x, init, x_more):
    y, s = mixer(x, init, resets=packed_mask())
    if x_more is None:
        return y, None
    y_more, _ = mixer(x_more, s)
    return y, y_more


def run_separately(mixer, x, init, x_more):
    ys, more = [], []
    for row in range(x.shape[0]):
        parts, state = [], None
        for a, b, carried in documents(row):
            given = init.select(row) if (carried and init is not None) else None
            y, state = mixer(x[row : row + 1, a:b], given)
            parts.append(y)
        ys.append(torch.cat(parts, dim=1))
        if x_more is not None:
            more.append(mixer(x_more[row : row + 1], state)[0])
    return torch.cat(ys), (torch.cat(more) if more else None)


@pytest.mark.parametrize("name", MODELS)
def test_packed_batch_equals_documents_alone(name):
    mixer = make(name)
    causal = mixer.causal
    x = randn(3, T, D, seed=21)
    # a non-trivial given state (causal mixers only: a non-causal mixer's documents are whole)
    init = mixer(randn(3, 11, D, seed=22))[1].detach() if causal else None
    x_more = randn(3, MORE, D, seed=23) if causal else None
    w, w_more = randn(3, T, D, seed=24), randn(3, MORE, D, seed=25)
    params = [p for p in mixer.parameters() if p.requires_grad]
    names = ["x"] + [n for n, p in mixer.named_parameters() if p.requires_grad]
    for mode in mixer.modes:
        mixer.mode = mode
        results = []
        for run in (run_packed, run_separately):
            xx = x.clone().requires_grad_(True)
            y, y_more = run(mixer, xx, init, x_more)
            loss = (y * w).sum() + (0 if y_more is None else (y_more * w_more).sum())
            grads = torch.autograd.grad(loss, [xx, *params], allow_unused=True)
            results.append((y.detach(), None if y_more is None else y_more.detach(), grads))
        (y_p, more_p, g_p), (y_s, more_s, g_s) = results
        close(y_p, y_s, f"mode {mode}: packed output vs documents alone")
        if causal:
            close(more_p, more_s, f"mode {mode}: reading on from the packed final state vs the last document's")
        for n, a, b in zip(names, g_p, g_s):
            if a is None or b is None:
                assert a is None and b is None, f"mode {mode}: gradient of {n} missing in one run"
                continue
            close(a, b, f"mode {mode}: gradient of {n}, packed vs documents alone")


@pytest.mark.parametrize("name", [n for n in MODELS if make(n).causal])
def test_packing_composes_with_state_carry(name):
    """Splitting a packed call (its mask sliced with it) changes nothing, with boundaries at the split."""
    mixer = make(name)
    x, mask = randn(3, T, D, seed=26), packed_mask()
    for mode in mixer.modes:
        mixer.mode = mode
        y, s = mixer(x, resets=mask)
        for t in (1, CHUNK, 2 * CHUNK + 1, T - 1):
            y1, s1 = mixer(x[:, :t], resets=mask[:, :t])
            y2, s2 = mixer(x[:, t:], s1, resets=mask[:, t:])
            close(torch.cat([y1, y2], dim=1), y, f"mode {mode}: packed call split at t={t}")
            close(mixer(x[:, :3], s2)[0], mixer(x[:, :3], s)[0], f"mode {mode}: final state after the split at t={t}")


@pytest.mark.parametrize("name", [n for n in MODELS if make(n).causal])
def test_reset_at_a_single_token_drops_the_state(name):
    """T = 1 with a reset: the given state is gone; without one (or with an all-False mask) it is read."""
    mixer = make(name)
    _, s = mixer(randn(2, 9, D, seed=27))
    x = randn(2, 1, D, seed=28)
    fresh, _ = mixer(x)
    for mode in mixer.modes:
        mixer.mode = mode
        y, _ = mixer(x, s, resets=torch.tensor([[True], [False]]))
        close(y[:1], fresh[:1], f"mode {mode}: row 0 reset at its only token")
        close(y[1:], mixer(x[1:], s.select(1))[0], f"mode {mode}: row 1 not reset")
        close(mixer(x, s, resets=torch.zeros(2, 1, dtype=torch.bool))[0], mixer(x, s)[0], f"mode {mode}: no reset")


def test_bad_resets_are_clear_errors():
    mixer = make(MODELS[0])
    x = randn(2, 5, D)
    with pytest.raises(TypeError, match="torch.bool"):
        mixer(x, resets=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, time\]=\(2, 5\)"):
        mixer(x, resets=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        mixer(x, resets=[[True] * 5] * 2)
