"""In-context language learning: strings of a random regular language, predict the next symbol.

Each sequence has its own random DFA and shows strings sampled from it, separated by a
separator token; the model must infer the language in context. A prediction is right
when it is any symbol the DFA allows next (``Batch.valid``), not only the sampled one.

    tokens: 0 = padding, 1 = separator "|", 2 .. num_symbols + 1 = symbols
    inputs:  s_1 s_2 .. | s'_1 s'_2 .. | ...   (strings back to back, truncated to seq_len)
    target at t: the token at t + 1

Source: Akyürek et al., "In-Context Language Learning: Architectures and Algorithms"
(2024), reference code berlino/seq_icl, src/dataloaders/dfa.py and train.py
(``_get_dfa_accuracy``). As there: V = 20 (18 symbols, separator, padding); 4-12 states;
an alphabet of 4-18 symbols; every state has 1-3 outgoing edges on distinct symbols to
distinct other states (no self loops); every state accepts; the DFA is minimised and
trimmed; 10-19 strings of 1-49 symbols, each a uniform random walk from the start state;
no separator after the last string. The reference labels separator targets -100 and its
metric skips them, so positions whose next token is the separator (the end of a string)
are unsupervised and the separator is not an acceptable prediction. With
``supervise_separator=True`` those positions are supervised too and, since every state
accepts, the separator is acceptable at every position inside a string.

Longer sequences (``fill``): False (reference) keeps 10-19 strings and pads the rest;
True keeps sampling strings from the same DFA until seq_len is full.

Train/test split: by the DFA's language. The minimal DFA with states numbered in
breadth-first order from the start state (symbols in increasing order) is a canonical form
of the language; ``split_of`` hashes its edge list (``DFA.encoding``). Sampling is Python
per sequence (random walks), with uniforms drawn in chunks from the torch generator.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from recur.tasks.base import TEST_FRACTION, Batch, Task, TaskParams, register_task, split_of

PAD, SEP, FIRST_SYMBOL = 0, 1, 2
MAX_STATES, MAX_EDGES = 32, 8  # fix the width of DFA.encoding, so the split depends on the language only
_ENCODING_WIDTH = 1 + MAX_STATES * (1 + 2 * MAX_EDGES)
_MAX_ROUNDS = 64


@dataclass(frozen=True)
class DFA:
    """A partial DFA over symbol tokens: start state 0, every state accepting.

    ``transitions[s]`` maps a symbol token to the next state; a missing symbol is rejected.
    """

    transitions: tuple[dict[int, int], ...]

    def encoding(self) -> list[int]:
        """[num_states, then per state: out-degree, (symbol, target) by symbol], zero-padded."""
        code = [len(self.transitions)]
        for edges in self.transitions:
            code.append(len(edges))
            for sym in sorted(edges):
                code += [sym, edges[sym]]
        return code + [0] * (_ENCODING_WIDTH - len(code))


def canonical_dfa(transitions: list[dict[int, int]]) -> DFA:
    """Trim, minimise and renumber a partial all-accepting DFA with start state 0.

    Trim: keep the states reachable from 0. Minimise (Moore): start from one block (all
    states accept; missing edges go to an implicit rejecting sink) and split blocks by the
    blocks their edges lead to until stable. Renumber: breadth first from the start,
    symbols in increasing order. Two DFAs of the same language give the same result.
    """
    reachable, todo = {0}, [0]
    while todo:
        for nxt in transitions[todo.pop()].values():
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    states = sorted(reachable)
    block = {s: 0 for s in states}
    num_blocks = 1
    while True:
        signature = {s: (block[s], tuple(sorted((c, block[t]) for c, t in transitions[s].items()))) for s in states}
        ids: dict = {}
        block = {s: ids.setdefault(signature[s], len(ids)) for s in states}
        if len(ids) == num_blocks:
            break
        num_blocks = len(ids)
    # renumber the blocks breadth first; any member of a block gives the block's edges
    member = {block[s]: s for s in states}
    number, order, queue = {block[0]: 0}, [block[0]], deque([block[0]])
    while queue:
        b = queue.popleft()
        for c in sorted(transitions[member[b]]):
            nb = block[transitions[member[b]][c]]
            if nb not in number:
                number[nb] = len(order)
                order.append(nb)
                queue.append(nb)
    return DFA(tuple({c: number[block[t]] for c, t in transitions[member[b]].items()} for b in order))


class _Uniforms:
    """Uniform floats in [0, 1) drawn from a torch.Generator in chunks and handed out in order."""

    def __init__(self, generator: torch.Generator, chunk: int = 8192):
        self.generator, self.chunk = generator, chunk
        self.buffer: list[float] = []
        self.pos = 0

    def below(self, k: int) -> int:
        """Uniform integer in [0, k)."""
        if self.pos == len(self.buffer):
            self.buffer = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()
            self.pos = 0
        u = self.buffer[self.pos]
        self.pos += 1
        return min(int(u * k), k - 1)

    def between(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return lo + self.below(hi - lo + 1)

    def choose(self, population: list, k: int) -> list:
        """k distinct items in random order (partial Fisher-Yates on a copy)."""
        pool = list(population)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


class DfaIcllParams(TaskParams):
    num_symbols: int = Field(18, ge=2, le=254, description="symbol tokens shared by all DFAs (vocab = this + 2)")
    min_states: int = Field(4, ge=2, le=MAX_STATES)
    max_states: int = Field(12, ge=2, le=MAX_STATES)
    min_alphabet: int = Field(4, ge=1, description="symbols of one DFA: drawn from the num_symbols")
    max_alphabet: int = Field(18, ge=1)
    max_edges: int = Field(3, ge=1, le=MAX_EDGES, description="outgoing edges per state: 1 to this")
    min_strings: int = Field(10, ge=1)
    max_strings: int = Field(19, ge=1)
    min_string_len: int = Field(1, ge=1)
    max_string_len: int = Field(49, ge=1)
    fill: bool = Field(False, description="keep adding strings until seq_len is full (default: pad)")
    supervise_separator: bool = Field(False, description="also supervise string ends (separator targets)")

    @model_validator(mode="after")
    def _consistent(self):
        for lo, hi in [("min_states", "max_states"), ("min_alphabet", "max_alphabet"),
                       ("min_strings", "max_strings"), ("min_string_len", "max_string_len")]:
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo}={getattr(self, lo)} is larger than {hi}={getattr(self, hi)}")
        if self.max_alphabet > self.num_symbols:
            raise ValueError(f"max_alphabet={self.max_alphabet} exceeds num_symbols={self.num_symbols}")
        if self.max_edges > self.min_alphabet:
            raise ValueError(f"max_edges={self.max_edges} needs min_alphabet >= {self.max_edges} (distinct symbols)")
        if self.max_edges > self.min_states - 1:
            raise ValueError(f"max_edges={self.max_edges} needs min_states >= {self.max_edges + 1} "
                             f"(distinct targets, no self loops)")
        return self


@register_task
class DfaIcll(Task):
    name = "dfa_icll"
    Params = DfaIcllParams
    description = ("Strings of a per-sequence random DFA: s s s | s s | ... (0 pad, 1 separator, symbols from 2); "
                   "target = next token, supervised inside strings (not at string ends unless "
                   "supervise_separator). Metric: the predicted token is any symbol the DFA allows next "
                   "(Batch.valid). Train/test DFAs disjoint by language.")

    @property
    def vocab_size(self) -> int:
        return self.params.num_symbols + FIRST_SYMBOL

    def min_seq_len(self) -> int:
        return 2

    def answer_tokens(self) -> range:
        return range(SEP if self.params.supervise_separator else FIRST_SYMBOL, self.vocab_size)

    def chance(self, seq_len: int | None = None) -> float:
        """Several symbols are right at a position (every one the DFA allows next), so chance is the
        mean, over the supervised positions of 64 test sequences (a fixed seed) at ``seq_len``
        (default 256), of the share of ``answer_tokens()`` that is acceptable there."""
        batch = self.batch(64, seq_len or 256, torch.Generator().manual_seed(0), split="test")
        answers = self.answer_tokens()
        acceptable = batch.valid[..., answers.start:answers.stop].sum(-1)[batch.mask]
        return float(acceptable.double().mean()) / len(answers) if acceptable.numel() else 0.0

    # -- sampling ---------------------------------------------------------------------------
    def _random_dfa(self, u: _Uniforms) -> DFA:
        p = self.params
        num_states = u.between(p.min_states, p.max_states)
        symbols = list(range(FIRST_SYMBOL, FIRST_SYMBOL + p.num_symbols))
        alphabet = u.choose(symbols, u.between(p.min_alphabet, p.max_alphabet))
        transitions = []
        for s in range(num_states):
            k = u.between(1, p.max_edges)
            others = [t for t in range(num_states) if t != s]
            transitions.append(dict(zip(u.choose(alphabet, k), u.choose(others, k))))
        return canonical_dfa(transitions)

    def sample_dfas(self, n: int, split: str, u: _Uniforms) -> list[DFA]:
        """Rejection sampling of ``n`` DFAs whose language belongs to ``split``."""
        want_test = split == "test"
        rate = TEST_FRACTION if want_test else 1.0 - TEST_FRACTION
        kept: list[DFA] = []
        for _ in range(_MAX_ROUNDS):
            cands = [self._random_dfa(u) for _ in range(int((n - len(kept)) / rate * 1.2) + 8)]
            in_test = split_of(torch.tensor([d.encoding() for d in cands])).tolist()
            kept += [d for d, t in zip(cands, in_test) if t == want_test]
            if len(kept) >= n:
                return kept[:n]
        raise ValueError(f"could not draw {n} DFAs of the {split!r} split in {_MAX_ROUNDS} rounds: the space of "
                         f"DFAs under these parameters is too small")

    def _strings(self, dfa: DFA, length: int, u: _Uniforms) -> tuple[list[int], list[int]]:
        """Tokens (up to ``length``) of the strings shown for ``dfa``, and the DFA state after each
        token within its string (-1 after a separator: the next string starts at state 0)."""
        p = self.params
        out = [sorted(edges) for edges in dfa.transitions]
        tokens: list[int] = []
        states: list[int] = []
        num_strings = u.between(p.min_strings, p.max_strings)
        shown = 0
        while len(tokens) < length and (shown < num_strings or p.fill):
            if shown:
                tokens.append(SEP)
                states.append(-1)
            state = 0
            for _ in range(u.between(p.min_string_len, p.max_string_len)):
                sym = out[state][u.below(len(out[state]))]
                state = dfa.transitions[state][sym]
                tokens.append(sym)
                states.append(state)
            shown += 1
        return tokens[:length], states[:length]

    def sample(self, n: int, seq_len: int, generator: torch.Generator,
               split: str = "train") -> tuple[Batch, list[DFA]]:
        """A batch and the DFA of each row (for inspection and tests)."""
        self.check_split(split)
        self.check_seq_len(seq_len)
        u = _Uniforms(generator)
        dfas = self.sample_dfas(n, split, u)
        V, S = self.vocab_size, max(len(d.transitions) for d in dfas)
        seq = torch.full((n, seq_len + 1), PAD, dtype=torch.int64)
        # state index per position: -1 -> start state (after a separator), S -> no state (padding)
        state = torch.full((n, seq_len + 1), S, dtype=torch.int64)
        allowed = torch.zeros(n, S + 1, V, dtype=torch.bool)  # allowed[i, s]: symbols out of state s
        for i, dfa in enumerate(dfas):
            toks, sts = self._strings(dfa, seq_len + 1, u)
            seq[i, :len(toks)] = torch.tensor(toks)
            state[i, :len(sts)] = torch.tensor(sts)
            for s, edges in enumerate(dfa.transitions):
                allowed[i, s, list(edges)] = True
        inputs, targets = seq[:, :-1], seq[:, 1:]
        rows = torch.arange(n)[:, None]
        valid = allowed[rows, state[:, :-1].clamp(min=0)]  # after a separator: state 0's symbols
        mask = targets >= FIRST_SYMBOL
        if self.params.supervise_separator:
            in_string = inputs >= FIRST_SYMBOL  # a non-empty string may end here
            valid[..., SEP] = in_string
            mask |= (targets == SEP) & in_string
        valid &= (inputs != PAD)[..., None]
        return Batch(inputs, targets, mask, valid=valid), dfas

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        return self.sample(n, seq_len, generator, split)[0]
