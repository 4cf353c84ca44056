"""``transducer``: the joint network and its loss (against every alignment enumerated through the
model's own networks, gradcheck into the model's parameters), greedy decoding (against a one-row
reference, the symbols-per-frame cap), features from the task, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from recur.models.transducer import Transducer, TransducerOutput
from recur.tasks import get_task
from recur.tasks.base import Batch


def brute_force_nll(z: torch.Tensor, classes: list[int]) -> float:
    """-log of the sum of every path's probability, each path followed move by move from (0, 0)."""
    p = z.detach().double().softmax(-1)
    T, U = p.shape[0], len(classes)

    def paths_from(t: int, u: int) -> float:  # total probability of the paths from node (t, u) to the end
        total = float(p[t, u, 0]) * (paths_from(t + 1, u) if t + 1 < T else 1.0 if u == U else 0.0)
        if u < U:
            total += float(p[t, u, classes[u]]) * paths_from(t, u + 1)
        return total

    return -math.log(paths_from(0, 0))


def model(**kw):
    torch.manual_seed(0)
    return Transducer(vocab_size=2, d_model=8, n_labels=3, joint_dim=6, **kw).double()


def lattice(m: Transducer, f: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """z(t, u) [T, U + 1, classes] of one utterance, each node computed on its own."""
    history = torch.tensor([[0] + [y + 1 for y in labels]])
    g, _ = m.predict(history)
    return torch.stack([torch.stack([m.joint(f[t], g[0, u]) for u in range(len(labels) + 1)]) for t in range(len(f))])


def test_the_forward_gives_the_encoder_frames_and_the_first_lattice_row():
    m = model()
    x = torch.tensor([[0, 1, 0, 0]])
    out = m(x)
    assert isinstance(out, TransducerOutput) and out.encoded.shape == (1, 4, 6) and out.logits.shape == (1, 4, 4)
    torch.testing.assert_close(out.logits[0], lattice(m, out.encoded[0], [])[:, 0])


def test_the_loss_sums_every_alignment_of_each_rows_utterance():
    m = model()
    x = torch.zeros(2, 5, dtype=torch.int64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    labels = torch.tensor([[2, 0, 0], [1, -1, -1]])
    out = m(x)
    want = []
    for b, (frames, ys) in enumerate([([0, 1, 2, 3], [2, 0, 0]), ([1, 3, 4], [1])]):
        z = lattice(m, out.encoded[b, frames], ys)
        want.append(brute_force_nll(z, [y + 1 for y in ys]) / len(ys))
    got = m.loss(out, Batch(x, torch.zeros_like(x), mask, labels=labels))
    assert got.item() == pytest.approx(sum(want) / 2, rel=1e-10)


class LossOf(torch.nn.Module):
    """The model's loss on a batch as a module call (for functional_call)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, batch):
        return self.m.loss(self.m(x), batch)


def test_gradcheck_of_the_loss_into_the_joint_and_prediction_networks():
    m = model()
    x = torch.zeros(2, 3, dtype=torch.int64)
    batch = Batch(x, torch.zeros_like(x), torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool),
                  labels=torch.tensor([[0, 2], [1, -1]]))
    names = ["joint_out.weight", "joint_predictor.weight", "label_embed.weight", "joint_encoder.bias"]
    wrapped = LossOf(m)

    def loss(*values):
        return functional_call(wrapped, {f"m.{n}": v for n, v in zip(names, values)}, (x, batch))

    params = dict(m.named_parameters())
    inputs = [params[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


def test_a_batch_without_labels_reads_the_targets_of_its_supervised_positions():
    m = model()
    x = torch.zeros(1, 6, dtype=torch.int64)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    targets = torch.tensor([[2, 0, 1, 2, 1, 2]])
    out = m(x)
    assert m.loss(out, Batch(x, targets, mask)).item() == \
        pytest.approx(m.loss(out, Batch(x, targets, mask, labels=torch.tensor([[0, 1, 1, 2]]))).item())


def greedy_one_row(m: Transducer, f: torch.Tensor) -> list[int]:
    """Greedy decoding of one utterance, node by node, recomputing the prediction network from scratch."""
    hyp: list[int] = []
    for t in range(len(f)):
        for _ in range(m.max_symbols):
            g, _ = m.predict(torch.tensor([[0] + [y + 1 for y in hyp]]))
            k = int(m.joint(f[t], g[0, -1]).argmax())
            if k == 0:
                break
            hyp.append(k - 1)
    return hyp


@pytest.mark.parametrize("max_symbols", [1, 3])
def test_greedy_decoding_of_a_batch_equals_each_row_decoded_alone(max_symbols):
    m = model(max_symbols=max_symbols)
    with torch.no_grad():
        m.joint_out.bias[0] -= 1.5  # a blank less likely: rows emit labels, several at some frames
    x = torch.zeros(3, 7, dtype=torch.int64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 0] = False
    out = m(x)
    out.encoded = torch.randn(out.encoded.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    got = m.decode(out, Batch(x, torch.zeros_like(x), mask))
    for b in range(3):
        assert got[b] == greedy_one_row(m, out.encoded[b, mask[b]])
    assert sum(map(len, got)) > 0
    assert all(len(h) <= max_symbols * int(mask[b].sum()) for b, h in enumerate(got))


def test_the_cap_bounds_the_symbols_per_frame():
    m = model(max_symbols=2)
    with torch.no_grad():
        m.joint_out.bias[0] = -50.0  # never the blank: every frame emits exactly the cap
    x = torch.zeros(1, 4, dtype=torch.int64)
    out = m(x)
    assert len(m.decode(out, Batch(x, x, torch.ones(1, 4, dtype=torch.bool)))[0]) == 8


def test_features_from_the_task_train_through_the_loss_and_score():
    task = get_task("digit_strings", frame_dim=5, max_digits=2)
    from recur.config import ModelConfig

    m = Transducer.from_config(ModelConfig(arch="transducer", mixer="lstm", d_model=16, n_layers=1),
                               vocab_size=task.vocab_size, **task.model_io())
    assert m.feature_dim == 5 and m.n_labels == 10
    batch = task.batch(4, task.min_seq_len(), torch.Generator().manual_seed(0))
    out = m(batch.inputs, **batch.model_inputs())
    loss = m.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())
    # an untrained model is near uniform over 11 classes: the loss per label is about the paths' entropy
    assert 0 < loss.item() < 10 * math.log(11)
    scores = task.score_output(m, out, batch)
    assert set(scores) == {"label_error_rate", "exact_match"} and scores["label_error_rate"] >= 0


def test_bad_options_and_outputs_are_clear_errors():
    with pytest.raises(ValueError, match="max_symbols"):
        model(max_symbols=0)
    with pytest.raises(ValueError, match="joint_dim"):
        Transducer(vocab_size=2, d_model=8, joint_dim=1)
    with pytest.raises(ValueError, match="predictor_layers"):
        Transducer(vocab_size=2, d_model=8, predictor_layers=0)
    m = model()
    x = torch.zeros(1, 3, dtype=torch.int64)
    batch = Batch(x, x, torch.ones(1, 3, dtype=torch.bool), labels=torch.tensor([[1]]))
    from recur.models.base import ModelOutput

    with pytest.raises(ValueError, match="encoder outputs"):
        m.loss(ModelOutput(m(x).logits, None), batch)
