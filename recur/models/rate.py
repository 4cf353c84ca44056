"""``rate``: the Recurrent Action Transformer with Memory (Cherepanov, Staroverov, Yudin, Kovalev,
Panov, "Recurrent Action Transformer with Memory", 2023), as the authors' ``RATE`` computes it
(CognitiveAISystems/RATE, ``RATE/RATE_model.py``): an RMT over trajectory segments whose next
memory passes through a Memory Retention Valve (MRV).

Per segment s of ``segment_len`` tokens (K timesteps of a trajectory: 2K tokens on ``tmaze``,
observation then action; 3K in the authors' layout, which adds the return-to-go), with
M = ``n_memory`` memory vectors m_{s-1} [M, d]:

    h = Backbone([m_{s-1} ; E x_s ; m_{s-1}])             one causal pass over M + L + M positions
    logits_s = W_head norm(h[M : M + L])                    the tokens' positions
    u_s = norm(h[M + L :])                                  the write positions (RMT's next memory)
    m_s = MRV(m_{s-1}, u_s)                                 the Memory Retention Valve

    MRV(m, u) = W_o concat_heads( softmax(Q K^T / sqrt(d / H)) V ) + b_o,
        Q = W_q m + b_q,   K = W_k act(u) + b_k,   V = W_v act(u) + b_v       (H = ``mrv_heads``)

a cross-attention from the memory the segment read (queries) to its act-ivated candidates (keys
and values), every memory vector seeing every candidate, no residual and no norm: the authors'
``mha_mem_to_mem(mem_tokens, new_mem_tokens, new_mem_tokens)`` with ``new_mem_tokens =
mrv_act(hidden[:, -M:])``. ``mrv_heads=0`` switches it off (the authors' ``n_head_ca=0``): then
m_s = u_s and the model is ``rmt`` exactly, the ablation the paper compares with. The authors'
T-Maze runs (``run_experiments/TMaze.sh``): RATE with n_head_ca 2, relu, 15 memory tokens, 10
layers of d 64 without feed-forward (``skip_dec_ffn``), segments of 50 steps, 3 segments; their RMT
baseline n_head_ca 0, 10 memory tokens, 8 layers with feed-forward. The paper compares RATE with RMT and
DT on T-Maze (their evaluation: corridors of T - 2 for T up to 9600, ``src/inference_handler.py``);
its project page reports that RATE extrapolates to sequences of 9600 steps.

m_0 is the learned parameter ``memory`` (randn * std of the token embedding). Logits are the token
positions'. A segment that the input ends inside is read as ``[m ; E x]`` with no write (it is
causal, so its outputs are those of the complete segment). The segment loop, the state's pending
segment, packing and truncated BPTT are ``recur.models.segments``; the read and write positions are
``recur.models.rmt``, whose cell this one extends by the valve.

Options: those of ``rmt`` (``segment_len``, ``n_memory`` (default 4), ``bptt_segments``) plus
``mrv_heads`` (2, the authors' T-Maze ``n_head_ca``; 0: no valve) and ``mrv_act`` (``relu``, the
authors' default; ``leaky_relu``, ``elu``, ``tanh`` or ``none``).

State: ``State(memory=State(tokens=[batch, M, d_model]), pending=[batch, segment_len - 1,
d_model], count=int64 [batch])``, constant in size: (M + segment_len - 1) * d_model floats.

Interpretations of the authors' code (``RATE/RATE_model.py`` unless named):
* Attention among the memory tokens: their mask lets the M read tokens see one another both ways
  and likewise the M write tokens (``dec_attn_mask[:M, :M] = 0``, ``[-M:, -M:] = 0``); here the
  whole cell is causal, as in ``rmt``, so that any causal recur mixer can be its token mixer.
* The valve's input: their ``hidden`` is the output of the last post-norm layer, so normalised;
  here u_s is the final norm of the pre-norm Backbone's write positions (``rmt``'s memory).
* Training: their trainer (``src/trainer.py``) detaches the memory before every segment and steps
  the optimiser after each, so no gradient crosses a segment boundary and the valve's weights get
  none at all. Here the default is full BPTT over the call (``bptt_segments=None``), which trains
  the valve; ``bptt_segments=0`` detaches as they do (one optimiser step per call, though).
* Memory init: theirs repeats one randn vector M times (``[torch.randn(1, d)] * M``); here the M
  vectors are drawn independently, as ``rmt``'s.
* Embeddings and positions: they embed return-to-go, observation and action with separate maps
  (a linear map, a linear map, an embedding then tanh) interleaved (R, o, a) and read the action
  at o; here a task's token stream shares one embedding table and the head spans the vocabulary.
  Their layers are Transformer-XL's (relative positions, post-norm, dropout, also in the valve);
  here the Backbone's (rotary positions restarting each segment, pre-norm, no dropout). The
  paper's third mechanism, a cache of earlier segments' hidden states (``mem_len``), is 0 in
  their T-Maze runs and is not implemented. Their ``elu`` option is a typo (``==`` for ``=``)
  that leaves no activation set; here it is elu.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.common import merge_heads, split_heads
from recur.models.rmt import RMT
from recur.registry import ARCHITECTURES
from recur.state import State

ACTIVATIONS = {"relu": F.relu, "leaky_relu": F.leaky_relu, "elu": F.elu, "tanh": torch.tanh, "none": lambda u: u}


class MemoryRetentionValve(nn.Module):
    """RATE's valve: multi-head cross-attention from the previous memory to act(the written candidates)."""

    def __init__(self, d_model: int, n_heads: int, act: str = "relu"):
        super().__init__()
        self.n_heads, self.act_name, self.act = n_heads, act, ACTIVATIONS[act]
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """m: the memory the segment read [batch, M, d]; u: its candidates [batch, M, d] -> the next memory."""
        a = self.act(u)
        q, k, v = (split_heads(p(x), self.n_heads) for p, x in ((self.W_q, m), (self.W_k, a), (self.W_v, a)))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [batch, heads, M, M]
        return self.W_o(merge_heads(w @ v))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, act={self.act_name}"


@ARCHITECTURES.register("rate", family="segment memory",
                        paper="Cherepanov et al., Recurrent Action Transformer with Memory (2023)")
class RATE(RMT):
    """Recurrent Action Transformer with Memory: RMT's read/write memory tokens, the next memory through a valve."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 segment_len: int = 32, n_memory: int = 4, mrv_heads: int = 2, mrv_act: str | None = "relu",
                 bptt_segments: int | None = None):
        if isinstance(mrv_heads, bool) or not isinstance(mrv_heads, int) or mrv_heads < 0:
            raise ValueError(f"mrv_heads must be an int >= 0 (0: no Memory Retention Valve), got {mrv_heads!r}")
        if mrv_heads and d_model % mrv_heads:
            raise ValueError(f"mrv_heads={mrv_heads} must divide d_model={d_model}")
        mrv_act = "none" if mrv_act is None else mrv_act
        if mrv_act not in ACTIVATIONS:
            raise ValueError(f"mrv_act must be one of {sorted(ACTIVATIONS)}, got {mrv_act!r}")
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options,
                         shared_blocks=shared_blocks, segment_len=segment_len, n_memory=n_memory,
                         bptt_segments=bptt_segments)
        self.mrv = MemoryRetentionValve(d_model, mrv_heads, mrv_act) if mrv_heads else None

    def cell(self, e: torch.Tensor, memory: State, write: bool) -> tuple[torch.Tensor, State | None]:
        h, written = super().cell(e, memory, write)  # written: u_s, RMT's next memory
        if written is None or self.mrv is None:
            return h, written
        return h, State(tokens=self.mrv(memory["tokens"], written["tokens"]))

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> RATE:
        # T = 23 ends inside the fifth segment of 5; attention's parallel mode is the fast path
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="attention", segment_len=5,
                   n_memory=2, mrv_heads=2)
