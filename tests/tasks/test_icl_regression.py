"""icl_regression: every target is w . x of its sequence's own function, laid out as Garg et al.
interleave it; the splits hold different functions; least squares is exact once i > d; the scores
are the squared error / d; a model with real-valued inputs and a regression head trains on it."""

from __future__ import annotations

import math

import pytest
import torch

from recur.config import RunConfig
from recur.tasks import get_task
from recur.training.trainer import Trainer, build


def test_layout_targets_and_the_function_of_each_row():
    task = get_task("icl_regression", n_dims=3)
    b = task.batch(16, 9, torch.Generator().manual_seed(0))  # k = 5 examples, the last without its y
    assert b.inputs.shape == (16, 9) and b.features.shape == (16, 9, 3) and b.values.shape == (16, 9, 1)
    assert b.inputs[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert b.mask[0].tolist() == [True, False] * 4 + [True]
    x = b.features[:, 0::2]  # [16, 5, 3]
    y_in = b.features[:, 1::2]  # (y, 0, 0)
    assert torch.equal(y_in[..., 1:], torch.zeros_like(y_in[..., 1:]))
    y = b.values[:, 0::2, 0]
    torch.testing.assert_close(y[:, :4], y_in[..., 0])  # the y read after x_i is x_i's target
    # one linear function per row: 3 examples fix w, and it predicts every other example
    for r in range(16):
        w = torch.linalg.solve(x[r, :3].double(), y[r, :3].double())
        torch.testing.assert_close(x[r].double() @ w, y[r].double(), rtol=1e-4, atol=1e-4)
    assert not b.mask[:, 1::2].any() and torch.equal(b.targets, torch.zeros_like(b.targets))


def test_active_dims_zeroes_the_coordinates_above_it_and_noise_perturbs_y():
    b = get_task("icl_regression", n_dims=6, active_dims=2).batch(8, 10, torch.Generator().manual_seed(1))
    assert torch.equal(b.features[:, 0::2, 2:], torch.zeros(8, 5, 4))
    clean = get_task("icl_regression", n_dims=2).batch(64, 10, torch.Generator().manual_seed(2))
    noisy = get_task("icl_regression", n_dims=2, noise_std=0.5).batch(64, 10, torch.Generator().manual_seed(2))
    torch.testing.assert_close(clean.features[:, 0::2], noisy.features[:, 0::2])  # the same draws
    diff = (noisy.values - clean.values)[noisy.mask]
    assert 0.35 < float(diff.std()) < 0.65


def test_train_and_test_hold_different_functions_and_draws_are_seeded():
    task = get_task("icl_regression", n_dims=4)
    train = task.batch(512, 8, torch.Generator().manual_seed(0), split="train")
    test = task.batch(512, 8, torch.Generator().manual_seed(0), split="test")

    def functions(b):  # w from the first 4 examples, rounded as the split rounds it
        x, y = b.features[:, 0::2].double(), b.values[:, 0::2, 0].double()
        w = torch.linalg.solve(x, y)
        return {tuple(row) for row in torch.round(w * 1e3).long().tolist()}

    assert not functions(train) & functions(test)
    again = task.batch(512, 8, torch.Generator().manual_seed(0), split="train")
    assert torch.equal(train.features, again.features) and torch.equal(train.values, again.values)


def test_least_squares_is_exact_once_there_are_d_examples_and_predicting_zero_scores_one():
    task = get_task("icl_regression", n_dims=5)
    b = task.batch(2048, 22, torch.Generator().manual_seed(3), split="test")
    ls = task.least_squares_error(b)
    assert ls["mse@1"] == pytest.approx(1.0, abs=0.1)  # no example yet: the estimate is 0
    assert ls["mse@3"] == pytest.approx(3 / 5, abs=0.08)  # 2 examples span 2 of the 5 dimensions
    assert max(ls[f"mse@{i}"] for i in range(6, 12)) < 1e-8
    zero = task.score_values(torch.zeros(b.inputs.shape), b)
    assert zero["mse"] == pytest.approx(1.0, abs=0.05)  # E[(w.x)^2] / d = 1
    assert zero["mse_last"] == zero["mse@11"]
    exact = task.score_values(b.values[..., 0], b)
    assert exact["mse"] == 0.0


def test_bad_parameters_and_chance_fail_clearly():
    with pytest.raises(ValueError, match="active_dims"):
        get_task("icl_regression", n_dims=3, active_dims=4)
    with pytest.raises(ValueError, match="n_dims"):
        get_task("icl_regression", n_dims=0)
    with pytest.raises(ValueError, match="regression task"):
        get_task("icl_regression").chance(10)


@pytest.mark.parametrize("arch,args", [("causal_lm", {}), ("looped_lm", {"n_loops": 3, "loss_loops": 2})])
def test_a_model_built_for_the_task_reads_features_and_learns_the_regression(arch, args):
    # two layers (or loops): one to bring x_j to y_j's position, one for x_i to read the pairs
    cfg = RunConfig.model_validate({"task": {"name": "icl_regression", "seq_len": 10, "args": {"n_dims": 1}},
                                    "model": {"arch": arch, "mixer": "attention", "n_layers": 2 if arch == "causal_lm"
                                              else 1, "d_model": 32, "block": {"mlp": None}, "args": args},
                                    "optim": {"steps": 300, "batch_size": 64, "lr": 3e-3}, "eval": {"batches": 4}})
    task, model = build(cfg)
    assert model.feature_dim == 1 and model.head.out_features == 1
    result = Trainer(cfg, progress=False).fit()
    m = result.metrics["10"]
    assert set(m) >= {"mse", "mse_last", "mse@1", "mse@5"} and all(math.isfinite(v) for v in m.values())
    # predicting 0 scores 1 (and so does any model before its first example); measured: about 0.5 after 300 steps
    assert m["mse@1"] > 0.85 and m["mse_last"] < 0.8
    assert math.isnan(result.train_accuracy)  # a regression task has no accuracy: the early stop never fires
    assert result.steps == 300


def test_an_architecture_without_real_valued_inputs_cannot_serve_the_task():
    cfg = RunConfig.model_validate({"task": {"name": "icl_regression", "seq_len": 10},
                                    "model": {"arch": "universal_transformer", "mixer": "attention"}})
    with pytest.raises(ValueError, match="feature_dim.*causal_lm or looped_lm"):
        build(cfg)
