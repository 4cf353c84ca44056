"""``ctc``: the CTC loss path (gradcheck, the labelling probability), greedy and prefix beam search
decoding (beam width 1 against greedy, the beam against the exact best labelling and greedy), the
utterance taken from the mask, features, and clear errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from recur.models.ctc import CTC, greedy_decode, prefix_beam_search, utterance_frames
from recur.tasks import get_task
from recur.tasks.base import Batch


def labelling_log_prob(log_probs: torch.Tensor, classes: list[int]) -> float:
    """log Pr(z | x) of one utterance [T, C] (blank 0), by torch's CTC."""
    if not classes:
        return float(log_probs[:, 0].sum())
    return -float(F.ctc_loss(log_probs[:, None].double(), torch.tensor([classes]), torch.tensor([log_probs.shape[0]]),
                             torch.tensor([len(classes)]), blank=0, reduction="sum"))


def brute_force_best(log_probs: torch.Tensor) -> tuple[list[int], float]:
    """The most probable labelling, summing every frame path into its labelling."""
    T, C = log_probs.shape
    sums: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(C), repeat=T):
        z = tuple(c for i, c in enumerate(path) if c != 0 and (i == 0 or path[i - 1] != c))
        sums[z] = sums.get(z, 0.0) + math.exp(sum(float(log_probs[t, c]) for t, c in enumerate(path)))
    best = max(sums, key=sums.get)
    return list(best), math.log(sums[best])


def model(**kw):
    torch.manual_seed(0)
    return CTC(vocab_size=2, d_model=16, n_labels=3, **kw).double()


def test_greedy_merges_repeats_and_drops_blanks():
    path = [0, 1, 1, 0, 1, 2, 2, 0, 0, 3]
    lp = torch.full((len(path), 4), -5.0)
    lp[torch.arange(len(path)), path] = 0.0
    assert greedy_decode(lp) == [1, 1, 2, 3]


def test_beam_width_1_is_greedy_when_each_frame_is_nearly_certain():
    # with every frame's argmax above 0.99, one kept prefix follows the best path exactly
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        T, C = 12, 4
        path = torch.randint(C, (T,), generator=gen)
        logits = torch.randn(T, C, generator=gen) * 0.5
        logits[torch.arange(T), path] += 9.0
        lp = logits.log_softmax(-1)
        assert (lp.max(-1).values.exp() > 0.99).all()
        assert prefix_beam_search(lp, 1)[0] == greedy_decode(lp)


def test_beam_search_beats_greedy_on_the_textbook_example():
    # two frames, p(a) = 0.4, p(blank) = 0.6 each: the best path is "" (0.36), but "a" sums
    # aa, a-, -a to 0.64; a beam of 2 finds it, a beam of 1 keeps "" as greedy does
    lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    assert greedy_decode(lp) == []
    z, score = prefix_beam_search(lp, 2)
    assert z == [1] and score == pytest.approx(math.log(0.64))
    assert prefix_beam_search(lp, 1)[0] == []
    assert score > labelling_log_prob(lp, greedy_decode(lp))


@pytest.mark.parametrize("seed", range(6))
def test_an_unpruned_beam_is_the_exact_best_labelling_and_never_below_greedy(seed):
    gen = torch.Generator().manual_seed(seed)
    T, C = 4, 3
    lp = (torch.randn(T, C, generator=gen, dtype=torch.float64) * 1.5).log_softmax(-1)
    z, score = prefix_beam_search(lp, 64)  # wider than every prefix of 4 frames: nothing is pruned
    best, best_score = brute_force_best(lp)
    assert z == best and score == pytest.approx(best_score, rel=1e-9)
    assert score == pytest.approx(labelling_log_prob(lp, z), rel=1e-9)
    assert score >= labelling_log_prob(lp, greedy_decode(lp)) - 1e-12


def test_the_loss_is_ctc_over_the_masked_frames_and_labels():
    m = model()
    gen = torch.Generator().manual_seed(1)
    x = torch.zeros(2, 7, dtype=torch.int64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 1, 0]], dtype=torch.bool)
    x[~mask] = 1
    batch = Batch(x, torch.zeros_like(x), mask, labels=torch.tensor([[0, 2, 2], [1, -1, -1]]))
    out = m(x)
    out.logits = torch.randn(2, 7, 4, generator=gen, dtype=torch.float64).log_softmax(-1)
    want = [-labelling_log_prob(out.logits[0, :5], [1, 3, 3]) / 3,
            -labelling_log_prob(out.logits[1, [1, 2, 3, 5]], [2]) / 1]
    assert m.loss(out, batch).item() == pytest.approx(sum(want) / 2, rel=1e-10)


def test_gradcheck_of_the_loss_path_in_float64():
    m = model()
    x = torch.zeros(2, 5, dtype=torch.int64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    batch = Batch(x, torch.zeros_like(x), mask, labels=torch.tensor([[0, 1], [2, -1]]))
    out = m(x)
    logits = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def loss(z):
        out.logits = z.log_softmax(-1)
        return m.loss(out, batch)

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-7)


def test_a_batch_without_labels_reads_the_targets_of_its_supervised_positions():
    m = model()
    x = torch.zeros(1, 6, dtype=torch.int64)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    targets = torch.tensor([[2, 0, 1, 2, 1, 2]])
    out = m(x)
    with_labels = Batch(x, targets, mask, labels=torch.tensor([[0, 1, 1, 2]]))
    assert m.loss(out, Batch(x, targets, mask)).item() == pytest.approx(m.loss(out, with_labels).item())


def test_decode_reads_each_rows_frames_and_maps_classes_to_labels():
    m = model(decoding="beam", beam_width=4)
    x = torch.zeros(2, 6, dtype=torch.int64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = m(x)
    paths = [[1, 0, 3, 3, 2, 2], [0, 2, 2, 0, 2, 1]]  # row 0's last two frames are not its utterance
    lp = torch.full((2, 6, 4), -9.0, dtype=torch.float64)
    for b, p in enumerate(paths):
        lp[b, torch.arange(6), torch.tensor(p)] = 0.0
    out.logits = lp.log_softmax(-1)
    batch = Batch(x, torch.zeros_like(x), mask)
    assert m.decode(out, batch) == [[0, 2], [1, 1, 0]]
    assert m.decode(out, batch, decoding="greedy") == [[0, 2], [1, 1, 0]]


def test_utterance_frames_keeps_the_masked_frames_in_order():
    x = torch.arange(10).view(2, 5)
    frames, lengths = utterance_frames(x, torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool))
    assert lengths.tolist() == [3, 1]
    assert frames[0, :3].tolist() == [1, 3, 4] and frames[1, 0] == 5


def test_features_feed_the_encoder_and_the_task_builds_it():
    task = get_task("digit_strings", frame_dim=6, max_digits=2)
    from recur.config import ModelConfig

    m = CTC.from_config(ModelConfig(arch="ctc", mixer="lstm", d_model=16, n_layers=1), vocab_size=task.vocab_size,
                        **task.model_io())
    assert m.feature_dim == 6 and m.n_labels == 10
    batch = task.batch(3, task.min_seq_len(), torch.Generator().manual_seed(0))
    out = m(batch.inputs, **batch.model_inputs())
    assert out.logits.shape == (3, task.min_seq_len(), 11)
    loss = m.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and m.encoder.features.weight.grad.abs().sum() > 0
    assert set(task.score_output(m, out, batch)) == {"label_error_rate", "exact_match"}
    with pytest.raises(ValueError, match="features"):
        m(batch.inputs)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="decoding"):
        model(decoding="viterbi")
    with pytest.raises(ValueError, match="beam_width"):
        model(beam_width=0)
    with pytest.raises(ValueError, match="n_labels"):
        CTC(vocab_size=2, d_model=8, n_labels=0)
    m = model()
    x = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="labels must lie"):
        m.loss(m(x), Batch(x, x, torch.ones(1, 3, dtype=torch.bool), labels=torch.tensor([[5]])))
    with pytest.raises(ValueError, match="no supervised frame"):
        m.loss(m(x), Batch(x, x, torch.zeros(1, 3, dtype=torch.bool), labels=torch.tensor([[1]])))
