"""``memn2n``: End-To-End Memory Networks (Sukhbaatar, Szlam, Weston & Fergus, 2015) as a recurrent
reader: K hops of soft attention over the memory of the sentences read so far.

    model = MemN2N(vocab_size=48, d_model=32, hops=3, memory_size=50)
    out = model(tokens)        # out.logits [batch, time, vocab]: the answer, read out at every position

Tokens are words; a token of ``sentence_end`` (default 1 and 2: story_qa's "." and "?") closes the
sentence in progress and is no word of it. With adjacent weight tying the model has K + 1 embedding
matrices E^0..E^K (B = A^1 = E^0, A^{k+1} = C^k = E^k, W^T = C^K = E^K) and K + 1 temporal matrices
T^0..T^K tied the same way (T_A^k = T^{k-1}, T_C^k = T^k). At every position t:

    bag_E(x)  = sum_j l_j * E x_j,   l_kj = (1 - j/J) - (k/d)(1 - 2j/J)       position encoding (PE)
    u^1       = bag_B(the sentence in progress, up to t)                    J: its words so far
    m^k_i     = bag_{A^k}(x_i) + T_A^k(i),   c^k_i = bag_{C^k}(x_i) + T_C^k(i)
    p^k       = softmax_i(u^k . m^k_i),   o^k = sum_i p^k_i c^k_i,   u^{k+1} = u^k + o^k
    logits_t  = W u^{K+1}                                                   (softmax: the answer)

over the memory x_1, x_2, .. of the last ``memory_size`` sentences completed before t, x_1 the most
recent (the paper's reverse order: T(i) is indexed by a sentence's age). At a sentence end the query
is the sentence it closes, read against the memory before it; the sentence enters the memory after
that position. So the answer to "where is mary ?" is read at the "?", and the logits at a word are
the answer to the question so far: causal and per position, which is what makes state carry,
stepping and truncated BPTT meaningful for a model the paper reads out once per question.

The state is that memory, bounded as in the paper (50 sentences, the oldest dropped): the bags of
the last ``memory_size`` sentences under every E^k, newest first, how many slots are filled, and the
sentence in progress as running sums S0 = sum_j e_j and S1 = sum_j j e_j under every E^k with its
word count J, since PE needs J only when read: bag = (1 - k/d) S0 + (2k/d - 1) S1 / J. That is
(K + 1) d (memory_size + 2) floats at any length; carrying it across calls equals one call on the
concatenation, and a call may end mid-sentence.

Modes of the memory (``SentenceMemory``): ``parallel`` (default) reads every position at once (the
in-sentence sums by a segmented scan, then each hop as one attention of every position over the
carried slots and the sentences closed in the call, masked to the memory_size most recent before
it); ``recurrent`` (the reference) reads token by token and pushes each sentence into the FIFO.

Linear start (LS, optional): the first ``linear_start`` training calls (forward in training mode with
gradients) run the hops without their softmax (p^k_i = u^k . m^k_i); the paper re-inserts it when the
validation loss stalls, here after a fixed count, kept in a buffer so checkpoints resume it.
Not implemented: the paper's random noise (empty memories inserted in training) and its layer-wise
(RNN-like) tying.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import positive_int
from recur.models.base import Architecture, ModelOutput, _model_config, check_count, check_tokens
from recur.registry import ARCHITECTURES
from recur.state import State

SENTENCE_END = (1, 2)  # story_qa's "." and "?"
INIT_STD = 0.1  # the paper: weights drawn from N(0, 0.1)


def position_encoding(total: torch.Tensor, weighted: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """The PE bag sum_j l_j * e_j from its running sums: ``total`` = sum_j e_j and ``weighted`` =
    sum_j j e_j ([..., d]), ``words`` = J (int, broadcastable to them; an empty sentence is 0)."""
    d = total.shape[-1]
    k = torch.arange(1, d + 1, device=total.device, dtype=total.dtype) / d
    return (1 - k) * total + (2 * k - 1) * weighted / words.clamp(min=1).to(total.dtype)


def attend(scores: torch.Tensor, valid: torch.Tensor, linear: bool) -> torch.Tensor:
    """Attention weights over the memory slots (last dimension), zero at invalid slots; an empty
    memory gives all zeros (o = 0). ``linear``: the scores themselves (linear start)."""
    if linear:
        return torch.where(valid, scores, 0.0)
    # the most negative finite float, not -inf: a row with no valid slot stays finite (then zeroed)
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1) * valid


def segment_cumsum(v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sums of ``v`` [batch, time, ...] over time, restarting where ``start`` [batch,
    time] is True: a segmented Hillis-Steele scan (log2 T steps), with no cancellation of a global
    cumulative sum minus its value at the segment start."""
    extra = (1,) * (v.ndim - 2)
    flag, shift, T = start, 1, v.shape[1]
    while shift < T:
        stop = flag[:, shift:]
        carry = torch.where(stop.view(*stop.shape, *extra), 0.0, v[:, :-shift])
        v = torch.cat([v[:, :shift], v[:, shift:] + carry], dim=1)
        flag = torch.cat([flag[:, :shift], stop | flag[:, :-shift]], dim=1)
        shift *= 2
    return v


class SentenceMemory(Mixer):
    """MemN2N's memory and hops as a mixer (used by ``MemN2N``, not registered on its own).

    x: [batch, time, (hops + 1) * width + 1], per token its embeddings e^0..e^K under E^0..E^K (zero
    at a sentence end) and last a 1.0 where the token ends a sentence (else 0.0); y: u^{K+1},
    [batch, time, width]. Owns the temporal matrices T^0..T^K ([memory_size, width] each).
    """

    name = "memn2n"
    modes = ("parallel", "recurrent")
    state_formula = "(hops + 1) * width * (memory_size + 2)"

    def __init__(self, width: int, hops: int, memory_size: int, mode: str | None = None):
        positive_int("width", width, owner="memn2n")
        positive_int("hops", hops, owner="memn2n")
        positive_int("memory_size", memory_size, owner="memn2n")
        super().__init__((hops + 1) * width + 1, mode)
        self.width, self.hops, self.memory_size = width, hops, memory_size
        self.temporal = nn.ParameterList(nn.Parameter(torch.randn(memory_size, width) * INIT_STD)
                                         for _ in range(hops + 1))
        self.linear = False  # linear start: the hops without softmax (set by MemN2N per call)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        n, d, M = self.hops + 1, self.width, self.memory_size
        floats = dict(device=device, dtype=dtype or self.temporal[0].dtype)
        return State(memory=torch.zeros(batch_size, M, n, d, **floats),  # slot a: the sentence of age a
                     filled=torch.zeros(batch_size, dtype=torch.int64, device=device),
                     partial_sum=torch.zeros(batch_size, n, d, **floats),  # sum_j e_j of the open sentence
                     partial_weighted=torch.zeros(batch_size, n, d, **floats),  # sum_j j e_j
                     partial_words=torch.zeros(batch_size, dtype=torch.int64, device=device))

    def _forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        e = x[..., :-1].unflatten(-1, (self.hops + 1, self.width))  # [batch, time, K+1, d]
        end = x[..., -1] > 0.5
        e = e * (~end)[..., None, None].to(e.dtype)  # a sentence end is no word
        if self.mode == "recurrent":
            return self._recurrent(e, end, state)
        return self._parallel(e, end, state)

    def read(self, u: torch.Tensor, slots: torch.Tensor, age: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The K hops from u^1 [batch, time, d] over ``slots`` [batch, S, K+1, d] (the bags), each of
        ``age`` [batch, time, S] (clamped into [0, memory_size)) where ``valid`` [batch, time, S]."""
        M = self.memory_size
        for k in range(1, self.hops + 1):
            t_a, t_c = self.temporal[k - 1], self.temporal[k]  # T_A^k, T_C^k
            scores = torch.einsum("btd,bsd->bts", u, slots[:, :, k - 1]) + (u @ t_a.T).gather(-1, age)
            p = attend(scores, valid, self.linear)
            by_age = torch.zeros(*p.shape[:2], M, dtype=p.dtype, device=p.device).scatter_add(-1, age, p)
            u = u + torch.einsum("bts,bsd->btd", p, slots[:, :, k]) + by_age @ t_c
        return u

    def _recurrent(self, e: torch.Tensor, end: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The reference: token by token, the paper's FIFO of sentences."""
        M = self.memory_size
        memory, filled = state["memory"], state["filled"]
        total, weighted, words = state["partial_sum"], state["partial_weighted"], state["partial_words"]
        ages = torch.arange(M, device=e.device)
        ys = []
        for t in range(e.shape[1]):
            word, closes = ~end[:, t], end[:, t]
            words_t = words + word.long()
            total_t = total + e[:, t]
            weighted_t = weighted + words_t[:, None, None].to(e.dtype) * e[:, t]
            bag = position_encoding(total_t, weighted_t, words_t[:, None, None])  # [batch, K+1, d]
            valid = (ages[None] < filled[:, None])[:, None]  # [batch, 1, M]
            ys.append(self.read(bag[:, None, 0], memory, ages.expand(e.shape[0], 1, M), valid))
            memory = torch.where(closes[:, None, None, None], torch.cat([bag[:, None], memory[:, :-1]], dim=1), memory)
            filled = torch.where(closes, (filled + 1).clamp(max=M), filled)
            keep = word[:, None, None]
            total, weighted = torch.where(keep, total_t, 0.0), torch.where(keep, weighted_t, 0.0)
            words = torch.where(word, words_t, 0)
        return torch.cat(ys, dim=1), State(memory=memory, filled=filled, partial_sum=total,
                                           partial_weighted=weighted, partial_words=words)

    def _parallel(self, e: torch.Tensor, end: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Every position at once: the open sentence's sums by a segmented scan, the memory as the
        carried slots plus the sentences closed in this call, masked per position."""
        T = end.shape[1]
        n, d, M = self.hops + 1, self.width, self.memory_size
        word = ~end
        start = torch.ones_like(end)  # a sentence starts at t = 0 and after every end
        start[:, 1:] = end[:, :-1]
        continues = start.long().cumsum(dim=1) == 1  # in the sentence left open by the previous call
        c4 = continues[..., None, None]
        t_idx = torch.arange(T, device=e.device)
        seg = torch.where(start, t_idx, 0).cummax(dim=1).values  # where each position's sentence starts
        count = word.long().cumsum(dim=1)
        words = count - (count - word.long()).gather(1, seg)
        words = words + torch.where(continues, state["partial_words"][:, None], 0)  # J up to t
        total = segment_cumsum(e, start) + c4 * state["partial_sum"][:, None]
        weighted = segment_cumsum(words[..., None, None].to(e.dtype) * e, start)
        weighted = weighted + c4 * state["partial_weighted"][:, None]
        bag = position_encoding(total, weighted, words[..., None, None])  # [batch, time, K+1, d]

        # memory slots: the carried ones (age a at the call's start), then the sentences closed here
        closed_before = end.long().cumsum(dim=1) - end.long()  # sentences closed in the call before t
        n_closed = end.sum(dim=1)
        N = int(n_closed.max())
        order = torch.argsort((~end).to(torch.int8), dim=1, stable=True)[:, :N]  # their end positions
        closed = bag.gather(1, order[..., None, None].expand(-1, -1, n, d))  # [batch, N, K+1, d]
        slots = torch.cat([state["memory"], closed], dim=1)
        a, i = torch.arange(M, device=e.device), torch.arange(1, N + 1, device=e.device)
        age_carried = a + closed_before[..., None]
        age_closed = closed_before[..., None] - i  # sentence i of the call (i = 1: its first)
        valid = torch.cat([(a < state["filled"][:, None, None]) & (age_carried < M),
                           (age_closed >= 0) & (age_closed < M)], dim=-1)
        age = torch.cat([age_carried, age_closed], dim=-1).clamp(0, M - 1)
        y = self.read(bag[:, :, 0], slots, age, valid)

        # the state after the last token: the memory_size most recent sentences, newest first
        c = n_closed[:, None]
        index = torch.where(a < c, M + c - a - 1, a - c).clamp(0, M + N - 1)
        kept = (a < c) | (a - c < state["filled"][:, None])
        memory = slots.gather(1, index[..., None, None].expand(-1, -1, n, d))
        memory = torch.where(kept[..., None, None], memory, 0.0)
        open_ = word[:, -1]
        new = State(memory=memory, filled=(state["filled"] + n_closed).clamp(max=M),
                    partial_sum=torch.where(open_[:, None, None], total[:, -1], 0.0),
                    partial_weighted=torch.where(open_[:, None, None], weighted[:, -1], 0.0),
                    partial_words=torch.where(open_, words[:, -1], 0))
        return y, new


@ARCHITECTURES.register("memn2n", family="memory network",
                        paper="Sukhbaatar, Szlam, Weston & Fergus, End-To-End Memory Networks (NeurIPS 2015)")
class MemN2N(Architecture):
    """K hops of attention over a memory of sentences, the answer read out at every position.

    Position and temporal encoding, adjacent weight tying; the query is the sentence so far."""

    def __init__(self, vocab_size: int, d_model: int = 32, hops: int = 3, memory_size: int = 50,
                 sentence_end: int | Sequence[int] = SENTENCE_END, linear_start: int = 0):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        positive_int("d_model", d_model)
        ends = [sentence_end] if isinstance(sentence_end, int) else list(sentence_end)
        if not ends or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in ends):
            raise ValueError(f"memn2n: sentence_end must be token ids in [0, {vocab_size}) (one or several), "
                             f"got {sentence_end!r}")
        if isinstance(linear_start, bool) or not isinstance(linear_start, int) or linear_start < 0:
            raise ValueError(f"memn2n: linear_start must be an int >= 0 (training calls without the hops' "
                             f"softmax), got {linear_start!r}")
        self.vocab_size, self.hops, self.linear_start = vocab_size, hops, linear_start
        self.memory = SentenceMemory(d_model, hops, memory_size)
        self.embeddings = nn.ModuleList(nn.Embedding(vocab_size, d_model) for _ in range(hops + 1))  # E^0..E^K
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=INIT_STD)
        self.register_buffer("sentence_end", torch.tensor(sorted(set(ends))), persistent=False)
        self.register_buffer("train_calls", torch.zeros((), dtype=torch.int64))

    # -- the paper's matrices, tied adjacently (A^{k+1} = C^k, B = A^1, W^T = C^K) ----------------
    def A(self, k: int) -> nn.Embedding:  # noqa: N802 - the paper's names
        """A^k, the memory input embedding of hop k (1-based)."""
        return self.embeddings[self._hop(k) - 1]

    def C(self, k: int) -> nn.Embedding:  # noqa: N802
        """C^k, the memory output embedding of hop k."""
        return self.embeddings[self._hop(k)]

    @property
    def B(self) -> nn.Embedding:  # noqa: N802
        """B, the question embedding (= A^1)."""
        return self.embeddings[0]

    @property
    def W(self) -> nn.Parameter:  # noqa: N802
        """W [vocab, d], the answer matrix: logits = W u^{K+1} (W^T = C^K as the paper's d x V matrix)."""
        return self.embeddings[self.hops].weight

    def T_A(self, k: int) -> nn.Parameter:  # noqa: N802
        """T_A^k [memory_size, d], the temporal encoding of hop k's memory inputs (row i: age i)."""
        return self.memory.temporal[self._hop(k) - 1]

    def T_C(self, k: int) -> nn.Parameter:  # noqa: N802
        """T_C^k, the temporal encoding of hop k's memory outputs."""
        return self.memory.temporal[self._hop(k)]

    def _hop(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.hops:
            raise ValueError(f"hops are numbered 1..{self.hops}, got {k!r}")
        return k

    # -- the protocol ----------------------------------------------------------------------------
    @property
    def memory_size(self) -> int:
        return self.memory.memory_size

    @property
    def segmentable(self) -> bool:
        return True  # causal logits per position: windows with the carried state read the same

    @property
    def linear(self) -> bool:
        """True during linear start (the hops without softmax)."""
        return self.linear_start > 0 and int(self.train_calls) < self.linear_start

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return self.memory.init_state(batch_size, device=device, dtype=dtype or self.W.dtype)

    def state_size(self, seq_len: int) -> int:
        return self.memory.state_size(seq_len)

    def memory_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the memory reads: every token's embeddings under E^0..E^K and its sentence-end flag."""
        end = torch.isin(tokens, self.sentence_end)
        e = torch.stack([emb(tokens) for emb in self.embeddings], dim=2)  # [batch, time, K+1, d]
        e = e.masked_fill(end[..., None, None], 0.0)
        return torch.cat([e.flatten(2), end[..., None].to(e.dtype)], dim=-1)

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None) -> ModelOutput:
        """``resets`` bool [batch, time]: True where a packed document starts (the memory and the open
        sentence are emptied before that token)."""
        check_tokens(tokens, self.vocab_size)
        self.memory.linear = self.linear
        if self.memory.linear and self.training and torch.is_grad_enabled():
            self.train_calls += 1
        u, state = self.memory(self.memory_input(tokens), state, resets=resets)
        return ModelOutput(u @ self.W.T, state)

    @classmethod
    def from_config(cls, config, vocab_size: int, **io: int) -> MemN2N:
        """``model.n_layers`` is the number of hops K (the paper's "layers"), ``model.d_model`` the
        embedding width d, ``model.args`` the other options (memory_size, sentence_end, linear_start).
        MemN2N has no token mixers and no blocks: ``model.mixer`` must be "memn2n"."""
        from recur.config import BlockConfig

        config = _model_config(config)
        if config.mixer != "memn2n":
            raise ValueError(f"architecture 'memn2n' has its own memory and no token mixers: set model.mixer to "
                             f"'memn2n' (recur run --arch memn2n --model memn2n), got {config.mixer!r}")
        if config.mixer_args or config.block != BlockConfig():
            raise ValueError("architecture 'memn2n' has no token mixers or blocks: model.mixer_args and model.block "
                             "do not apply (its options are model.args: memory_size, sentence_end, linear_start)")
        if "hops" in config.args:
            raise ValueError("memn2n: the number of hops is model.n_layers (--n-layers), not model.args.hops")
        return cls(vocab_size=vocab_size, d_model=config.d_model, hops=config.n_layers, **cls.io_options(io),
                   **config.args)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> MemN2N:
        # memory_size 3: random tokens close about 4 sentences in 23 (ends 1 and 2), so the cap drops some
        return cls(vocab_size=vocab_size, d_model=d_model, hops=3, memory_size=3)
