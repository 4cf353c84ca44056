"""``hmt``: the Hierarchical Memory Transformer (He, Cao, Sarkar, Zhou, Cong, "HMT: Hierarchical Memory
Transformer for Efficient Long Context Language Processing", 2024), as the authors' ``RecurrentWrapper``,
``MemoryCell`` and ``CrossAttentionMemory`` compute it (OswaldHe/HMT-pytorch,
``modeling_rmt/language_modeling.py`` and ``modeling_rmt/long_mem_cross_attn.py``), made causal (below).

Three memories: *sensory* (the last k tokens of the previous segment, prepended), *short-term* (one
prompt vector P read first and written last, as in RMT with one memory token) and *long-term* (a FIFO
cache Mem of the last N memory embeddings, searched by attention for the next prompt). Per segment n
of L = ``segment_len`` tokens with embeddings e_n = E x_n [L, d]:

    h = Backbone([P_n ; S_n ; e_n ; P_n])                one causal pass over 1 + k + L + 1 positions
    logits_n = W_head norm(h at e_n's positions)         (the sensory positions give no logits)
    m_n = norm(h[-1])                                    the new memory embedding (the write copy of P_n)
    Mem <- FIFO(Mem, m_n)                                append, keep the last N (drop the oldest)
    q_n = norm(Backbone([t ; e_n[L - r:] ; t])[-1])      representation encoding, r = round(sum_fraction L)
    P_{n+1} = softmax(W_q q_n (W_k Mem)^T / sqrt(h)) Mem  memory search over the filled cache entries
    S_{n+1} = e_n[L - k:]

with k = ``n_sensory``, N = ``n_cache``, h = ``recall_dim`` (W_q, W_k: [d, h], no bias; the values are
the raw memory embeddings: no W_v, as the authors' ``torch.matmul(scores, memory)``), t = ``query_token``
a learned encoding token and P_1 = ``memory`` a second learned vector (both initialised randn * std of the
token embedding: the authors' ``RecurrentWrapper.mem`` and ``MemoryCell.memory``).

Interpretations, with where they were read:

- **Empty cache.** Before the first write there is nothing to search: the authors'
  ``CrossAttentionMemory.forward`` returns None for a None cache and ``MemoryCell.forward`` then reads
  its learned ``memory`` (``set_memory``). So P_1 = ``memory``, and the first segment has no sensory
  tokens (``prepend_state`` is None). The search here is only run on a cache with at least one
  entry; P_2 = m_1 exactly (a softmax over one entry), as in the authors' code. ``memory_search``
  returns zeros for a row with no filled entry (never NaN), though the model never asks for one.
- **Masking.** The state has fixed shapes, so the cache is [N, d] with ``filled`` valid entries (the
  newest last, in slots N - filled .. N - 1); the unfilled slots get a score of -inf, so the softmax
  is the authors' softmax over their growing list (``memory_seq``, truncated to ``ltm_context``).
- **Where m_n and q_n are taken.** The authors take ``hidden_states[-1][:, -1:]`` of a Hugging Face
  causal LM, whose last hidden state is after the final norm (``ln_f``, ``norm``,
  ``final_layer_norm`` for GPT-2, Llama, OPT), for both the segment pass (``process_output``) and the
  encoding pass (the same ``memory_cell`` called on ``[mem ; x ; mem]``, their ``mem`` being t). Both
  are taken after the final norm here, as in ``rmt``.
- **Sensory tokens** are the last k tokens of the previous segment (``process_input``:
  ``prepend_list = input_ids[:, -n_prepend:]``), embedded again; the state keeps their embeddings.
  The encoding pass reads no sensory tokens (the authors pass no ``prepend_state`` to it). A partial
  segment (the input ends inside it) is read as ``[P ; S ; e]`` with no write copy, the authors'
  generation form; it is causal, so its outputs are those the complete segment would give.
- **Default k = 0**, the authors' ``--num_sensory`` default; their published runs use 32 of a
  256-token segment, so ``n_sensory`` about segment_len / 8 is the paper's setting. 0 keeps the
  default valid at any ``segment_len`` (k < segment_len is required) and a segment pass the RMT cost.
- **Not included**: the retrieval supervision (``pos_mask``: cross-entropy on the search scores), the
  ``browse`` / ``switch`` / ``MemoryMap`` test-time options, the loss over the last ``n_cell_out``
  segments only (recur's loss is the task's) and the bfloat16 casts.
- **BPTT.** The authors' ``manage_gradients`` assigns the detached memory to a local, so their BPTT is
  full over the unrolled segments; ``bptt_segments=k`` here really detaches the whole memory (prompt,
  cache and sensory embeddings) entering all but the last k transitions (``recur.models.segments``).

**Causal deviation.** The authors encode the *current* segment's first ``sum_fraction`` (q_n from
x_n[:L/2]) before reading it, so the prompt that every token of segment n reads depends on the first
half of segment n: a token early in the segment would see, through the search weights, tokens after
it. That is a leak in a causal LM (the authors score the whole segment at once, which hides it). Here
the query for segment n + 1 is computed when segment n is complete, from the last r tokens of segment
n, the r tokens right before segment n + 1: the authors' query window moved back by the least that
makes it causal (with ``sum_fraction=1`` both read a whole segment, one segment apart). The prompt
P_{n+1} is computed then and kept in the state; the cache it searches holds m_1 .. m_n, as the
authors' does when segment n + 1 starts.

The segment loop, the pending partial segment and packing are ``recur.models.segments``; any causal
recur mixer may be the cell's token mixer (``pattern``; attention's rotary positions restart at every
pass). Rows of one call may differ in whether they have read a segment (a state concatenated from
others, a packed batch): those with sensory tokens and those without run in two groups.

State: ``State(memory=State(prompt=[batch, 1, d_model], cache=[batch, N, d_model], filled=int64
[batch], sensory=[batch, k, d_model]), pending=[batch, segment_len - 1, d_model], count=int64
[batch])``, constant in size: (1 + N + k + segment_len - 1) * d_model floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.models.segments import SegmentLM
from recur.registry import ARCHITECTURES
from recur.state import State


def fifo_append(cache: torch.Tensor, filled: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``m`` [batch, 1, d] to the cache [batch, N, d] (newest last; the ``filled`` int64 [batch]
    valid entries are the last ones): the oldest slot drops out, ``filled`` grows up to N."""
    return torch.cat([cache[:, 1:], m], dim=1), (filled + 1).clamp(max=cache.shape[1])


class MemorySearch(nn.Module):
    """HMT's memory search: P = softmax(W_q q (W_k Mem)^T / sqrt(h)) Mem over the filled cache entries."""

    def __init__(self, d_model: int, recall_dim: int):
        super().__init__()
        self.recall_dim = recall_dim
        self.W_q = nn.Linear(d_model, recall_dim, bias=False)
        self.W_k = nn.Linear(d_model, recall_dim, bias=False)

    def forward(self, q: torch.Tensor, cache: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """q [batch, 1, d]; cache [batch, N, d], its last ``filled`` [batch] slots valid -> P [batch, 1, d]
        (zeros for a row with no valid slot)."""
        N = cache.shape[1]
        scores = self.W_q(q) @ self.W_k(cache).transpose(1, 2) / math.sqrt(self.recall_dim)  # [batch, 1, N]
        valid = torch.arange(N, device=cache.device) >= (N - filled)[:, None]  # [batch, N]
        scores = scores.masked_fill(~valid[:, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row: all -inf, NaN -> 0
        return weights @ cache


@ARCHITECTURES.register("hmt", family="segment memory",
                        paper="He et al., HMT: Hierarchical Memory Transformer for Efficient Long Context Language "
                              "Processing (2024)")
class HMT(SegmentLM):
    """Hierarchical Memory Transformer: RMT with one memory token, its prompt searched in a FIFO of past memories."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 segment_len: int = 32, n_cache: int = 32, n_sensory: int = 0, recall_dim: int | None = None,
                 sum_fraction: float = 0.5, bptt_segments: int | None = None):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options,
                         shared_blocks=shared_blocks, segment_len=segment_len, bptt_segments=bptt_segments)
        self.n_cache = positive_int("n_cache", n_cache)
        if isinstance(n_sensory, bool) or not isinstance(n_sensory, int) or not 0 <= n_sensory < segment_len:
            raise ValueError(f"n_sensory (tokens of the previous segment prepended) must be an int in "
                             f"[0, segment_len={segment_len}), got {n_sensory!r}")
        self.n_sensory = n_sensory
        recall_dim = d_model if recall_dim is None else positive_int("recall_dim", recall_dim)
        if isinstance(sum_fraction, bool) or not isinstance(sum_fraction, (int, float)) \
                or not 0 < sum_fraction <= 1 or round(sum_fraction * segment_len) < 1:
            raise ValueError(f"sum_fraction (the part of a segment the query encodes) must be a number in (0, 1] "
                             f"with round(sum_fraction * segment_len) >= 1 token, got {sum_fraction!r} at "
                             f"segment_len={segment_len}")
        self.sum_fraction = float(sum_fraction)
        self.n_query = int(round(sum_fraction * segment_len))  # the authors' int(round(segment_size * sum_fraction))
        std = self.embed.weight.detach().std()
        self.memory = nn.Parameter(torch.randn(1, d_model) * std)  # P_1, read while the cache is empty
        self.query_token = nn.Parameter(torch.randn(1, d_model) * std)  # t, the representation-encoding token
        self.search = MemorySearch(d_model, recall_dim)

    def init_memory(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        zeros = torch.zeros(batch_size, self.n_cache + self.n_sensory, self.d_model, device=device, dtype=dtype)
        return State(prompt=self.memory.to(device=device, dtype=dtype).expand(batch_size, -1, -1),
                     cache=zeros[:, :self.n_cache], filled=torch.zeros(batch_size, dtype=torch.int64, device=device),
                     sensory=zeros[:, self.n_cache:])

    def _read(self, e: torch.Tensor, prompt: torch.Tensor, sensory: torch.Tensor | None,
              write: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The segment pass [P ; S ; e ; P] (S omitted where None; the last P only with ``write``):
        (the tokens' hidden states, m = the normed final hidden state at the write copy, or None)."""
        front = [prompt] if sensory is None else [prompt, sensory]
        h, _ = self.backbone(torch.cat([*front, e, prompt] if write else [*front, e], dim=1))
        n = e.shape[1]
        start = h.shape[1] - n - write
        return h[:, start:start + n], (self.norm(h[:, -1:]) if write else None)

    def cell(self, e: torch.Tensor, memory: State, write: bool) -> tuple[torch.Tensor, State | None]:
        prompt, cache, filled, sensory = memory["prompt"], memory["cache"], memory["filled"], memory["sensory"]
        has = filled > 0  # rows that have read a segment: they have sensory tokens
        if self.n_sensory == 0 or bool(has.all()) or not bool(has.any()):
            h, m = self._read(e, prompt, sensory if self.n_sensory and bool(has.any()) else None, write)
        else:  # two groups, put back in row order
            yes, no = has.nonzero().flatten(), (~has).nonzero().flatten()
            a, b = self._read(e[yes], prompt[yes], sensory[yes], write), self._read(e[no], prompt[no], None, write)
            order = torch.cat([yes, no]).argsort()
            h = torch.cat([a[0], b[0]])[order]
            m = torch.cat([a[1], b[1]])[order] if write else None
        if not write:
            return h, None
        cache, filled = fifo_append(cache, filled, m)
        t = self.query_token.to(e.dtype).expand(e.shape[0], -1, -1)
        g, _ = self.backbone(torch.cat([t, e[:, e.shape[1] - self.n_query:], t], dim=1))
        q = self.norm(g[:, -1:])
        return h, State(prompt=self.search(q, cache, filled), cache=cache, filled=filled,
                        sensory=e[:, e.shape[1] - self.n_sensory:])

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> HMT:
        # T = 23 ends inside the fifth segment of 5; four writes to a cache of 2 evict twice, and the
        # last prompt is searched over two entries; attention's parallel mode is the fast path
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="attention", segment_len=5,
                   n_cache=2, n_sensory=2, recall_dim=8)
