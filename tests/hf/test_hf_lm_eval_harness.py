"""lm-eval-harness itself (0.4.13, installed by the test extra) on a recur model: ``HFLM`` scores a
local multiple-choice task file offline, and its log-likelihoods are recur's own."""

from __future__ import annotations

import json
import math

import pytest
import torch
from recur.hf import RecurConfig, RecurForCausalLM, byte_tokenizer

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

QUESTIONS = [("2 + 2 =", [" 4", " 5"], 0), ("The sky is", [" blue", " green", " loud"], 0),
             ("def f(x): return", [" x", " 7"], 1), ("import", [" os", " 3"], 0)]


def _stepped_logprob(lm, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) by recur alone, one token at a time with the carried state."""
    with torch.no_grad():
        logits, state = lm(torch.tensor([context]))
        total = 0.0
        for token in continuation:
            total += float(logits[0, -1].double().log_softmax(-1)[token])
            logits, state = lm(torch.tensor([[token]]), state)
    return total


@pytest.fixture(scope="module")
def hflm():
    torch.manual_seed(0)
    config = RecurConfig(recur_model={"mixer": "gru", "d_model": 16, "n_layers": 1}, vocab_size=257,
                         bos_token_id=256, eos_token_id=256, pad_token_id=256)  # as from_checkpoint sets for text
    model = RecurForCausalLM(config).double().eval()
    return model, HFLM(pretrained=model, tokenizer=byte_tokenizer(), backend="causal", batch_size=4,
                       add_bos_token=True, device="cpu")


def test_hflm_loglikelihoods_are_recurs_own(hflm):
    model, lm = hflm
    tok = byte_tokenizer()
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(q, c), idx=i)
                for i, (q, choices, _) in enumerate(QUESTIONS) for c in choices]
    scores = lm.loglikelihood(requests)
    for r, (score, _greedy) in zip(requests, scores):
        context, continuation = r.arguments
        want = _stepped_logprob(model.lm, tok(context).input_ids, tok(continuation, add_special_tokens=False).input_ids)
        assert score == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_simple_evaluate_scores_a_local_task_file(hflm, tmp_path):
    model, lm = hflm
    tok = byte_tokenizer()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / "toy.yaml").write_text(f"""task: recur_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    results = simple_evaluate(model=lm, tasks=["recur_toy"], task_manager=TaskManager(include_path=str(tasks)))
    acc = results["results"]["recur_toy"]["acc,none"]
    # the accuracy recur's own scores give: the choice of highest log-likelihood, per question
    right = 0
    for q, choices, answer in QUESTIONS:
        ctx = tok(q).input_ids
        lls = [_stepped_logprob(model.lm, ctx, tok(c, add_special_tokens=False).input_ids) for c in choices]
        right += int(max(range(len(choices)), key=lls.__getitem__) == answer)
    assert math.isclose(acc, right / len(QUESTIONS))
