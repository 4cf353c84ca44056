"""Story QA: generated bAbI-like stories of people moving between places, then one question.

Layout (one token per word of the fixed vocabulary ``WORDS``; "." is token 1, "?" token 2, the
sentence ends MemN2N reads by default; "_" (0) pads on the right):

    mary went to the kitchen . the garden is dark . john moved to the hallway . where is mary ? kitchen _ _
                                                                                            ^ target

The supervised position is the "?": its target is the answer, a location (the answer token follows it
in the input, as in a transcript; the model at "?" has not read it). Sentences:

    P went|moved|journeyed|travelled to the L .     a move (to a place other than P's current one)
    P picked up the O .   P dropped the O .         an object taken (by someone who has moved) or left
    P is hungry|tired|happy|bored .   the L is quiet|dark|cold|bright .     irrelevant facts

supporting_facts=1 (bAbI task 1, "single supporting fact"): "where is P ?" for a person who has moved:
the place of P's last move. Each sentence is a distractor with probability ``distractor_rate`` (an
irrelevant fact or an object taken or left), else a move of a random person (the other people's
moves are distractors too).
supporting_facts=2 (bAbI task 2, "two supporting facts"): "where is the O ?" for an object someone
has picked up: where its holder is now (the pick-up and the holder's last move), or where the holder
was when dropping it. A sentence is an irrelevant fact with probability ``distractor_rate``, else a
move or an object event (half each, a move where no object event is possible).

The story has ``sentences`` sentences whatever seq_len; a longer seq_len adds padding. Train and test
stories are disjoint by a hash of the story, question and answer (padded to the shortest length,
so a story keeps its split at every seq_len). Chance: 1 / locations (the answer is one of them).
Source: Weston et al., "Towards AI-Complete Question Answering: A Set of Prerequisite Toy Tasks"
(bAbI, 2015), tasks 1 and 2, whose data cannot be shipped; the vocabulary imitates theirs.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split

PEOPLE = ("mary", "john", "sandra", "daniel", "julie", "fred", "bill", "emily", "jeff", "yann")
OBJECTS = ("apple", "football", "milk", "ball", "book", "key")
LOCATIONS = ("kitchen", "garden", "hallway", "bathroom", "bedroom", "office", "cellar", "park", "school", "cinema")
VERBS = ("went", "moved", "journeyed", "travelled")
MOODS = ("hungry", "tired", "happy", "bored")
QUALITIES = ("quiet", "dark", "cold", "bright")
WORDS = ("_", ".", "?", "to", "the", "where", "is", "picked", "up", "dropped",
         *VERBS, *MOODS, *QUALITIES, *PEOPLE, *OBJECTS, *LOCATIONS)
ID = {w: i for i, w in enumerate(WORDS)}
PAD, END, QUESTION = ID["_"], ID["."], ID["?"]
FIRST_LOCATION = ID[LOCATIONS[0]]
LONGEST_SENTENCE = 6  # "P went to the L ." and "P picked up the O ."
MAX_TRIES = 10_000  # redraws of one story that has nothing to ask about


class StoryQAParams(TaskParams):
    people: int = Field(4, ge=1, le=len(PEOPLE), description="people in the stories")
    locations: int = Field(6, ge=2, le=len(LOCATIONS), description="places (the possible answers)")
    objects: int = Field(3, ge=1, le=len(OBJECTS), description="objects that can be picked up and dropped")
    sentences: int = Field(10, ge=1, le=256, description="sentences per story")
    distractor_rate: float = Field(0.3, ge=0, lt=1, description="probability that a sentence is a distractor")
    supporting_facts: int = Field(1, ge=1, le=2, description="1: where is a person (bAbI 1); 2: where is an "
                                                             "object someone carried (bAbI 2)")

    @model_validator(mode="after")
    def _two_facts_need_two_sentences(self):
        if self.supporting_facts == 2 and self.sentences < 2:
            raise ValueError("supporting_facts=2 needs sentences >= 2 (a move, then a pick-up)")
        return self


def _pick(u: float, options):
    return options[int(u * len(options))]


@register_task
class StoryQA(Task):
    name = "story_qa"
    Params = StoryQAParams
    description = ("bAbI-like stories ('mary went to the kitchen .' + distractors), then 'where is mary ?' "
                   "(supporting_facts=1) or 'where is the apple ?' (2) and the answer; '.'=1, '?'=2, padding 0 "
                   "on the right. Supervised at the '?': target the location. Metric: accuracy.")

    @property
    def vocab_size(self) -> int:
        return len(WORDS)

    def min_seq_len(self) -> int:
        question = 4 if self.params.supporting_facts == 1 else 5
        return LONGEST_SENTENCE * self.params.sentences + question + 1

    def answer_tokens(self) -> range:
        return range(FIRST_LOCATION, FIRST_LOCATION + self.params.locations)

    def story(self, draws: list[list[float]]) -> list[str] | None:
        """One story, question and answer as words, from ``draws`` (sentences + 1 rows of 6 uniform
        numbers); None when it leaves nothing to ask about."""
        p = self.params
        people, objects, places = PEOPLE[:p.people], OBJECTS[:p.objects], LOCATIONS[:p.locations]
        where: dict[str, str] = {}  # person -> place after the last move
        holder: dict[str, str] = {}  # object -> the person carrying it
        dropped: dict[str, str] = {}  # object -> where it was left
        words: list[str] = []
        for r in draws[:-1]:
            free = [o for o in objects if o not in holder]
            object_events = (["pick"] if where and free else []) + (["drop"] if holder else [])
            if r[0] < p.distractor_rate:
                kinds = ["mood", "quality"] + (object_events if p.supporting_facts == 1 else [])
            elif p.supporting_facts == 2 and object_events and r[1] < 0.5:
                kinds = object_events
            else:
                kinds = ["move"]
            kind = _pick(r[2], kinds)
            if kind == "move":
                person = _pick(r[3], people)
                place = _pick(r[4], [x for x in places if x != where.get(person)])
                words += [person, _pick(r[5], VERBS), "to", "the", place, "."]
                where[person] = place
            elif kind == "pick":
                person, thing = _pick(r[3], sorted(where, key=people.index)), _pick(r[4], free)
                words += [person, "picked", "up", "the", thing, "."]
                holder[thing] = person
                dropped.pop(thing, None)
            elif kind == "drop":
                thing = _pick(r[4], sorted(holder, key=objects.index))
                person = holder.pop(thing)
                words += [person, "dropped", "the", thing, "."]
                dropped[thing] = where[person]
            elif kind == "mood":
                words += [_pick(r[3], people), "is", _pick(r[4], MOODS), "."]
            else:
                words += ["the", _pick(r[3], places), "is", _pick(r[4], QUALITIES), "."]
        ask = draws[-1][0]
        if p.supporting_facts == 1:
            if not where:
                return None
            person = _pick(ask, sorted(where, key=people.index))
            return words + ["where", "is", person, "?", where[person]]
        carried = sorted([*holder, *dropped], key=objects.index)
        if not carried:
            return None
        thing = _pick(ask, carried)
        answer = where[holder[thing]] if thing in holder else dropped[thing]
        return words + ["where", "is", "the", thing, "?", answer]

    def draw(self, m: int, generator: torch.Generator) -> torch.Tensor:
        """``m`` stories as token rows padded to ``min_seq_len``: int64 [m, min_seq_len]."""
        width, rows = self.min_seq_len(), []
        shape = (self.params.sentences + 1, 6)
        for draws in torch.rand(m, *shape, generator=generator, dtype=torch.float64).tolist():
            words = self.story(draws)
            tries = 1
            while words is None:
                if tries == MAX_TRIES:
                    raise ValueError(f"story_qa {self.params.model_dump()}: {MAX_TRIES} stories in a row left "
                                     f"nothing to ask about; use more sentences or a lower distractor_rate")
                words = self.story(torch.rand(*shape, generator=generator, dtype=torch.float64).tolist())
                tries += 1
            rows.append([ID[w] for w in words] + [PAD] * (width - len(words)))
        return torch.tensor(rows, dtype=torch.int64).view(m, width)

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        rows = sample_rows_of_split(lambda m: self.draw(m, generator), n, split)
        inputs = torch.full((n, seq_len), PAD, dtype=torch.int64)
        inputs[:, :rows.shape[1]] = rows
        mask = inputs == QUESTION
        targets = torch.zeros_like(inputs)
        after = torch.zeros_like(mask)
        after[:, 1:] = mask[:, :-1]
        targets[mask] = inputs[after]  # the answer follows the "?"
        return Batch(inputs, targets, mask)
