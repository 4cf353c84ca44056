"""strokes: the layout (START, the points shifted by one as inputs, the next point as the target, PAD
after the end); undistorted offsets add up to the font's resampled glyph; the distortions vary with
the seed only; train and test hold different sequences; the single-Gaussian reference equals an mdn
whose head outputs the fitted Gaussian; the scores need a density head; a missing font package is a
clear error naming the extra."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from recur.models import CausalLM
from recur.models.mdn import MDN
from recur.tasks import get_task
from recur.tasks import strokes as strokes_module
from recur.tasks.strokes import PAD, POINT, START, glyph_strokes


def test_layout_inputs_are_the_targets_shifted_by_one_point():
    task = get_task("strokes")
    assert task.min_seq_len() == 40 and task.vocab_size == 3  # futural digits at step 2: the 8 and 0 are longest
    b = task.batch(16, 44, torch.Generator().manual_seed(0))
    assert b.features.shape == b.values.shape == (16, 44, 3) and b.mask.shape == (16, 44)
    for r in range(16):
        L = int(b.mask[r].sum())
        assert b.mask[r, :L].all() and 15 <= L <= 40
        assert b.inputs[r, 0] == START and (b.inputs[r, 1:L] == POINT).all() and (b.inputs[r, L:] == PAD).all()
        assert b.features[r, 0].tolist() == [0.0, 0.0, 1.0]
        assert torch.equal(b.features[r, 1:L], b.values[r, :L - 1])  # the input at t is the point t
        assert not b.features[r, L:].any() and not b.values[r, L:].any()
        assert b.values[r, L - 1, 2] == 1  # the character ends with the pen lifting
    assert set(b.values[b.mask][:, 2].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="seq_len >= 40"):
        task.batch(2, 39, torch.Generator().manual_seed(0))


def test_undistorted_offsets_add_up_to_the_resampled_glyph():
    task = get_task("strokes", charset="upper", jitter=0.0, slant=0.0, scale_jitter=0.0, step=1.5)
    strokes = glyph_strokes("futural", "A", 1.5)  # 3 strokes: two legs and the bar
    assert len(strokes) == 3
    for s in strokes:  # equal arc length pieces, no longer than the step
        gaps = (s[1:] - s[:-1]).norm(dim=1)
        assert gaps.max() <= 1.5 + 1e-9 and torch.allclose(gaps, gaps[0].expand_as(gaps))
    x = task.sequence("A", seed=7)
    torch.testing.assert_close(x[:, :2].cumsum(0) * 1.5, torch.cat(strokes))
    ends = torch.tensor([len(s) for s in strokes]).cumsum(0) - 1
    assert x[:, 2].nonzero().flatten().tolist() == ends.tolist()
    assert torch.equal(task.sequence("A", seed=8), x)  # nothing random is left
    # the Hershey legs of A meet at the top: (0, -12) in font units, y upwards here
    assert strokes[0][0].tolist() == [0.0, 12.0]


def test_distortions_vary_with_the_seed_and_are_bounded():
    task = get_task("strokes")
    plain = get_task("strokes", jitter=0.0, slant=0.0, scale_jitter=0.0).sequence("5", seed=0)
    a, b = task.sequence("5", seed=1), task.sequence("5", seed=2)
    assert a.shape == b.shape == plain.shape and not torch.allclose(a, b)
    assert torch.equal(a, task.sequence("5", seed=1)) and torch.equal(a[:, 2], plain[:, 2])
    # positions move by at most jitter + slant x height + scale x size (font units over the step)
    drift = (a[:, :2].cumsum(0) - plain[:, :2].cumsum(0)).abs().max() * 2.0
    assert 0.1 < float(drift) < 1.0 + 0.3 * 12 + 0.15 * 12 + 1e-6


def test_train_and_test_hold_different_sequences_and_batches_are_seeded():
    task = get_task("strokes", charset="alnum")
    T = task.min_seq_len()

    def rows(split):
        b = task.batch(256, T, torch.Generator().manual_seed(0), split=split)
        return b, {tuple(torch.round(b.values[r][b.mask[r]] * 1e4).flatten().long().tolist()) for r in range(256)}

    train, train_rows = rows("train")
    test, test_rows = rows("test")
    assert len(train_rows) == len(test_rows) == 256 and not train_rows & test_rows
    again = task.batch(256, T, torch.Generator().manual_seed(0), split="train")
    assert torch.equal(train.features, again.features) and torch.equal(train.mask, again.mask)


def test_the_reference_equals_an_mdn_that_outputs_the_fitted_gaussian():
    task = get_task("strokes")
    mean, cov, p = task.single_gaussian_fit()
    sx, sy = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
    rho = float(cov[0, 1]) / (sx * sy)
    model = MDN(vocab_size=3, d_model=8, n_layers=1, mixtures=1, feature_dim=3, target_dim=3).double()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([math.log(p / (1 - p)), 0.0, float(mean[0]), float(mean[1]),
                                            math.log(sx), math.log(sy), math.atanh(rho)]))
    b = task.batch(32, 40, torch.Generator().manual_seed(3), split="test")
    out = model(b.inputs, features=b.features.double())
    ours, ref = task.score_output(model, out, b), task.single_gaussian_nll(b)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ref["nll"] == pytest.approx(ref["nll_offset"] + ref["nll_pen"])
    # the fit is the maximum-likelihood one: moving the mean costs likelihood on the training points
    worse = model.head.bias.detach().clone()
    worse[2] += 0.3
    with torch.no_grad():
        model.head.bias.copy_(worse)
    train = task.batch(256, 40, torch.Generator().manual_seed(12345), split="train")
    moved = task.score_output(model, model(train.inputs, features=train.features.double()), train)["nll"]
    assert moved > task.single_gaussian_nll(train)["nll"]


def test_scores_need_a_density_head_and_options_are_checked():
    task = get_task("strokes")
    b = task.batch(2, 40, torch.Generator().manual_seed(0))
    lm = CausalLM(vocab_size=3, d_model=8, n_layers=1, pattern="gla", feature_dim=3, target_dim=3)
    with pytest.raises(ValueError, match="--arch mdn"):
        task.score_output(lm, lm(b.inputs, features=b.features), b)
    with pytest.raises(ValueError, match="font"):
        get_task("strokes", font="timesr")
    with pytest.raises(ValueError, match="charset"):
        get_task("strokes", charset="greek")
    with pytest.raises(ValueError, match="chance"):
        task.chance(40)
    assert task.model_io() == {"feature_dim": 3, "target_dim": 3} and "nll" in task.lower_is_better


def test_a_missing_font_package_names_the_extra(monkeypatch):
    glyph_strokes.cache_clear()
    monkeypatch.setitem(sys.modules, "HersheyFonts", None)  # what an uninstalled package imports as
    try:
        with pytest.raises(ImportError, match=r"pip install 'recur\[strokes\]'"):
            get_task("strokes").batch(2, 40, torch.Generator().manual_seed(0))
    finally:
        glyph_strokes.cache_clear()
    assert strokes_module.EXTRA == "pip install 'recur[strokes]'"
