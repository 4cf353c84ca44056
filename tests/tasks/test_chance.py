"""Every task's chance level (``Task.chance``) is honest: every supervised target (and every
acceptable answer) lies in ``answer_tokens()``, and guessing uniformly among those tokens scores it."""

from __future__ import annotations

import pytest
import torch

from recur.tasks import get_task, list_tasks, task_class

TASK_ARGS = {"mqar": {"vocab_size": 64, "num_kv_pairs": 4}, "set_disjointness": {"vocab_size": 64}}
SEQ_LEN = {"copy": 40, "fuzzy_recall": 64, "passkey": 40, "set_disjointness": 32}


# the library's classification tasks (a regression task, target_dim > 0, has no chance accuracy: its
# zero-estimator baseline is tested with it; nor has a task scored by the label error rate of decoded
# label sequences, batch.labels, such as digit_strings: no position has a target token)
@pytest.mark.parametrize("name", sorted(n for n in list_tasks() if not n.startswith("harness_")
                                        and not task_class(n).target_dim
                                        and "label_error_rate" not in task_class(n).lower_is_better))
def test_targets_lie_in_the_answer_tokens_and_uniform_guessing_scores_the_chance_level(name):
    task = get_task(name, **TASK_ARGS.get(name, {}))
    seq_len = max(SEQ_LEN.get(name, 32), task.min_seq_len())
    batch = task.batch(256, seq_len, torch.Generator().manual_seed(0), split="test")
    answers = task.answer_tokens()
    targets = batch.targets[batch.mask]
    assert ((targets >= answers.start) & (targets < answers.stop)).all()
    if batch.valid is not None:
        outside = torch.ones(task.vocab_size, dtype=torch.bool)
        outside[answers.start:answers.stop] = False
        assert not batch.valid[batch.mask][:, outside].any()
    chance = task.chance(seq_len)
    assert 0 < chance < 1
    if batch.valid is None:
        assert chance == pytest.approx(1 / len(answers))
    # guess uniformly among the answer tokens, many times: the mean accuracy is the chance level
    gen = torch.Generator().manual_seed(1)
    scores = []
    for _ in range(20):
        logits = torch.full((*batch.targets.shape, task.vocab_size), -1.0)
        logits[..., answers.start:answers.stop] = torch.rand(*batch.targets.shape, len(answers), generator=gen)
        scores.append(task.score(logits, batch)["accuracy"])
    mean = sum(scores) / len(scores)
    assert mean == pytest.approx(chance, abs=max(0.01, 0.15 * chance))
