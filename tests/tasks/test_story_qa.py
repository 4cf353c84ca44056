"""story_qa: generated bAbI-like stories (tasks 1 and 2), read back by an independent solver."""

from __future__ import annotations

import pytest
import torch

from recur.models.memn2n import SENTENCE_END
from recur.tasks import get_task, split_of
from recur.tasks.story_qa import ID, LOCATIONS, WORDS

CONFIGS = [{}, {"supporting_facts": 2}, {"people": 1, "locations": 2, "objects": 1, "sentences": 1},
           {"people": 10, "locations": 10, "objects": 6, "sentences": 30, "distractor_rate": 0.7},
           {"supporting_facts": 2, "sentences": 2, "distractor_rate": 0.0}]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sentences(words: list[str]) -> list[list[str]]:
    out, current = [], []
    for w in words:
        if w in (".", "?"):
            out.append(current)
            current = []
        else:
            current.append(w)
    return out


def solve(words: list[str]) -> str:
    """Read the story as a person would: who is where, who holds what, what was left where."""
    where, holder, left = {}, {}, {}
    *story, question = sentences(words[:words.index("?") + 1])
    for s in story:
        if len(s) == 5 and s[2:4] == ["to", "the"]:  # P went|moved|journeyed|travelled to the L
            where[s[0]] = s[4]
        elif s[1:3] == ["picked", "up"]:
            holder[s[4]] = s[0]
            left.pop(s[4], None)
        elif s[1] == "dropped":
            assert holder.pop(s[3]) == s[0], "only the holder drops an object"
            left[s[3]] = where[s[0]]
        else:
            assert s[1] == "is" or s[0] == "the", f"an irrelevant fact: {s}"
    assert question[:2] == ["where", "is"]
    if len(question) == 3:
        return where[question[2]]
    thing = question[3]
    return where[holder[thing]] if thing in holder else left[thing]


def rows(batch):
    for inputs, targets, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
        yield [WORDS[i] for i in inputs], targets, mask


def test_the_vocabulary_is_fixed_and_its_sentence_ends_are_memn2ns():
    assert len(WORDS) == len(set(WORDS)) == get_task("story_qa", people=1).vocab_size == 48
    assert (ID["."], ID["?"]) == SENTENCE_END and ID["_"] == 0
    task = get_task("story_qa", locations=4)
    assert [WORDS[i] for i in task.answer_tokens()] == list(LOCATIONS[:4]) and task.chance() == 0.25


@pytest.mark.parametrize("params", CONFIGS)
def test_same_seed_same_batch_other_seed_other_batch(params):
    task = get_task("story_qa", **params)
    a, b, c = (task.batch(16, task.min_seq_len(), gen(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("params", CONFIGS)
def test_the_independent_solver_finds_every_target(params):
    task = get_task("story_qa", **params)
    m = task.min_seq_len()
    for split in ("train", "test"):
        for seq_len in (m, m + 7):
            batch = task.batch(64, seq_len, gen(2), split)
            assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (64, seq_len)
            assert batch.inputs.dtype == torch.int64 and batch.mask.dtype == torch.bool
            assert int(batch.inputs.max()) < task.vocab_size and int(batch.inputs.min()) >= 0
            for words, targets, mask in rows(batch):
                q = words.index("?")
                assert mask == [t == q for t in range(seq_len)], "supervised at the '?' only"
                assert targets[q] == ID[solve(words)]
                assert set(words[q + 2:]) <= {"_"} and words[q + 1] == solve(words), "answer, then padding"
                assert len(sentences(words[:q])) == task.params.sentences


def test_distractors_come_at_the_rate_asked():
    def non_moves(rate, facts=1):
        task = get_task("story_qa", distractor_rate=rate, supporting_facts=facts, sentences=20)
        story = [s for words, _, _ in rows(task.batch(200, task.min_seq_len(), gen(3))) for s in
                 sentences(words[:words.index("?")])]
        return sum(s[2:4] != ["to", "the"] for s in story) / len(story), story

    assert non_moves(0.0)[0] == 0.0
    share, _ = non_moves(0.4)
    assert share == pytest.approx(0.4, abs=0.03)
    # two supporting facts: irrelevant facts at the rate, object events among the rest
    share, story = non_moves(0.4, facts=2)
    facts = sum(s[1] == "is" or s[0] == "the" for s in story) / len(story)
    assert facts == pytest.approx(0.4, abs=0.03) and share > facts + 0.15


def test_the_answer_needs_the_story_not_a_shortcut():
    """Single fact: the asked person is not usually the last to move, so the last place mentioned is
    often wrong; the answer is the last of that person's moves, not the first."""
    task = get_task("story_qa")
    last_place = first_move = 0
    n = 0
    for words, targets, mask in rows(task.batch(500, task.min_seq_len(), gen(4))):
        answer = WORDS[targets[mask.index(True)]]
        story = sentences(words[:words.index("?")])
        person = words[words.index("?") - 1]
        moves = [s[4] for s in story if s[2:4] == ["to", "the"] and s[0] == person]
        places = [w for w in words[:words.index("?")] if w in LOCATIONS]
        assert moves[-1] == answer
        last_place += places[-1] == answer
        first_move += moves[0] == answer and len(moves) > 1
        n += 1
    assert last_place / n < 0.6 and first_move / n < 0.15  # measured 0.38 and 0.07


def test_two_supporting_facts_ask_for_carried_and_dropped_objects():
    task = get_task("story_qa", supporting_facts=2)
    carried = dropped = moved_after = 0
    for words, _, _ in rows(task.batch(300, task.min_seq_len(), gen(5))):
        story = sentences(words[:words.index("?")])
        thing = words[words.index("?") - 1]
        last = max(i for i, s in enumerate(story) if thing in s and s[1] in ("picked", "dropped"))
        if story[last][1] == "dropped":
            dropped += 1
        else:
            carried += 1
            holder = story[last][0]
            moved_after += any(s[0] == holder and s[2:4] == ["to", "the"] for s in story[last + 1:])
    assert carried > 50 and dropped > 50 and moved_after > 30  # the holder's later move: a second fact


def test_train_and_test_stories_are_disjoint_at_every_length():
    task = get_task("story_qa", people=2, locations=2, sentences=2, distractor_rate=0.0)  # few stories
    m = task.min_seq_len()
    train = task.batch(2000, m, gen(6), "train").inputs
    test = task.batch(300, m + 9, gen(7), "test").inputs
    assert not split_of(train).any() and split_of(test[:, :m]).all()  # the hash of the story itself
    assert not set(map(tuple, train.tolist())) & set(tuple(r[:m]) for r in test.tolist())
    assert len(set(map(tuple, test.tolist()))) > 20
    # a longer seq_len only pads: the same draws give the same stories
    assert torch.equal(task.batch(50, m + 9, gen(8)).inputs[:, :m], task.batch(50, m, gen(8)).inputs)


@pytest.mark.parametrize("params,match", [
    ({"bogus": 1}, "bogus"),
    ({"locations": 1}, "locations"),
    ({"people": 11}, "people"),
    ({"supporting_facts": 3}, "supporting_facts"),
    ({"distractor_rate": 1.0}, "distractor_rate"),
    ({"supporting_facts": 2, "sentences": 1}, "sentences >= 2"),
])
def test_bad_params_are_clear_value_errors(params, match):
    with pytest.raises(ValueError, match=match):
        get_task("story_qa", **params)


def test_a_short_seq_len_names_the_shortest():
    task = get_task("story_qa", sentences=3)
    with pytest.raises(ValueError, match="seq_len >= 23"):
        task.batch(2, 22, gen(0))
