"""The Relational Memory Core (Santoro, Faulkner, Raposo, Rae, Chrzanowski, Weber, Wierstra,
Vinyals, Pascanu, Lillicrap, "Relational recurrent neural networks", NeurIPS 2018): a memory of
n_slots vectors that attend to each other and to the input at every step, then update with
LSTM-style gates.

    x~_t  = W_in x_t + b_in                                  the input as one more row: [slot_size]
    A     = [M_{t-1}; x~_t]                                   [n_slots + 1, slot_size]
    A     = LN(A + MHDPA(A))                                  memory and input attend to all rows
    A     = LN(A + MLP(A))                                    row-wise MLP, n_mlp_layers Linear layers with ReLU between
            (the attention block repeats n_blocks times)
    M~    = A[:n_slots]                                       the input row is dropped
    i, f  = sigmoid(W_g x~_t + U_g tanh(M_{t-1}) + b_g + (input_bias, forget_bias))   per slot
    M_t   = i * tanh(M~) + f * M_{t-1}
    y_t   = W_out flatten(M_t) + b_out                        [n_slots * slot_size] -> d_model

MHDPA(A) (the official Sonnet ``RelationalMemory._multihead_attention``): one Linear with bias to
n_heads * (2 key_size + head_size) features per row, a LayerNorm over all of them, split per head
into q, k, v; softmax(q k^T / sqrt(key_size)) v per head, heads concatenated (head_size *
n_heads = slot_size, no output projection). Every row (slot or input) attends to every row, so
the update is equivariant under permutations of the slots (with the gates, which are per slot
too); only the initial memory tells the slots apart.

Gates (Sonnet ``gate_style='unit'``, the paper's default): one input and one forget gate per
memory element, computed from the projected input x~_t (the same for every slot) and from
tanh(M_{t-1}) of the slot itself; ``forget_bias`` = 1 and ``input_bias`` = 0 are added before the
sigmoid. ``gate_style='memory'`` gives one scalar gate pair per slot. The official code has a
zero-initialised bias in both gate Linears; here they are one bias b_g (the same function).

The initial memory (Sonnet ``initial_state``): the identity, so that every slot starts distinct,
zero-padded (or truncated) to slot_size columns: M_0[s] = e_s. It is a constant of the config, so
``init_state`` returns it (batch-expanded): the state is the whole memory, and a fresh sequence
starts from the paper's memory, not from zeros (a zero memory would make every slot identical
and, by the permutation equivariance above, keep them identical for ever).

Initialisation: Sonnet's Linear default, truncated normal with std 1/sqrt(fan_in) (cut at two
standard deviations) and zero biases, for every Linear (input projection, qkv, MLP, gates, output
projection); LayerNorms start at scale 1, offset 0.

Defaults, scaled for recur's widths: slot_size = d_model (the paper's "head size x heads"), the
head count from ``head_split`` (16 -> 2 heads of 8; 64-wide heads at large widths),
key_size = head_size, n_slots = 4 (the paper's Nth-farthest model uses 8 slots, its language
models 1), n_blocks = 1, n_mlp_layers = 2, forget_bias = 1, input_bias = 0, gate_style 'unit'
(the Sonnet defaults). The state is M: n_slots * slot_size floats.

Nonlinear recurrence: ``recurrent`` mode only. The input projections and the input's share of
the gates for every step are computed before the loop and the output projection after it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import head_split, positive_int, positive_ints
from recur.registry import register
from recur.state import State


# Per-step work is a few rows of slot_size: tiny matmuls, layer norms and softmaxes. When the
# largest per-step product is below torch's parallel grain size (32768 elements), they are
# computed with elementwise ops and reductions, which stay on the calling thread: the library
# kernels (BLAS gemm, layer_norm, softmax) may enter an OpenMP parallel region even for a 5 x 16
# input, and on a busy machine the threads' wake-up latency (milliseconds) dwarfs the work of one
# step. Larger sizes use the library kernels, where threads pay off. Both compute the same function.
_SMALL = 32768


class _Ops:
    """matmul, layer_norm and softmax on the last dims, in small (elementwise) or library form."""

    def __init__(self, small: bool):
        self.small = small

    def linear(self, x, w_t, b):
        """x [..., k] @ w_t [k, n] + b."""
        return (x.unsqueeze(-1) * w_t).sum(-2) + b if self.small else torch.matmul(x, w_t) + b

    def scores(self, q, k):
        """q [..., m, d], k [..., r, d] -> q k^T [..., m, r]."""
        return (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) if self.small else q @ k.transpose(-1, -2)

    def mix(self, w, v):
        """w [..., m, r], v [..., r, d] -> w v [..., m, d]."""
        return (w.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2) if self.small else w @ v

    def layer_norm(self, x, scale, offset, eps: float = 1e-5):
        """Sonnet's LayerNorm (eps 1e-5) over the last dim."""
        if not self.small:
            return F.layer_norm(x, x.shape[-1:], scale, offset, eps)
        var, mean = torch.var_mean(x, dim=-1, correction=0, keepdim=True)
        return torch.addcmul(offset, (x - mean) * torch.rsqrt(var + eps), scale)

    def softmax(self, x):
        if not self.small:
            return torch.softmax(x, dim=-1)
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)


def _sonnet_linear(fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(weight [fan_out, fan_in], bias [fan_out]) with Sonnet's default initialisation."""
    std = 1.0 / math.sqrt(fan_in)
    weight = nn.Parameter(torch.empty(fan_out, fan_in))
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    return weight, nn.Parameter(torch.zeros(fan_out))


@register("rmc", family="classic",
          paper="Santoro et al., Relational recurrent neural networks (NeurIPS 2018)")
class RelationalMemory(Mixer):
    """Relational Memory Core: memory slots attend over [memory; input], then a gated LSTM-style update.

    A = [M_{t-1}; W_in x_t]; A = LN(A + MHDPA(A)); A = LN(A + MLP(A)); M~ = A[:n_slots];
    i, f = sigmoid(W x~_t + U tanh(M_{t-1}) + b); M_t = i * tanh(M~) + f * M_{t-1}; y_t = W_out flatten(M_t).
    Santoro et al., "Relational recurrent neural networks" (NeurIPS 2018); M_0 is the paper's identity memory.
    """

    modes = ("recurrent",)
    state_formula = "n_slots * slot_size"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_slots: int = 4,
        slot_size: int | None = None,
        n_heads: int | None = None,
        key_size: int | None = None,
        n_blocks: int = 1,
        n_mlp_layers: int = 2,
        gate_style: str = "unit",
        forget_bias: float = 1.0,
        input_bias: float = 0.0,
    ):
        super().__init__(d_model, mode)
        slot_size = d_model if slot_size is None else slot_size
        positive_ints("rmc", n_slots=n_slots, slot_size=slot_size, n_blocks=n_blocks, n_mlp_layers=n_mlp_layers)
        n_heads, head_size = head_split(slot_size, n_heads)
        key_size = positive_int("key_size", head_size if key_size is None else key_size, owner="rmc")
        if gate_style not in ("unit", "memory"):
            raise ValueError(f"rmc: gate_style must be 'unit' (per element) or 'memory' (per slot), got {gate_style!r}")
        self.n_slots, self.slot_size, self.n_heads, self.head_size = n_slots, slot_size, n_heads, head_size
        self.key_size, self.n_blocks, self.n_mlp_layers, self.gate_style = key_size, n_blocks, n_mlp_layers, gate_style
        self.forget_bias, self.input_bias = float(forget_bias), float(input_bias)
        S, qkv = slot_size, n_heads * (2 * key_size + head_size)

        self.in_weight, self.in_bias = _sonnet_linear(d_model, S)
        # Attention blocks: qkv Linear + LayerNorm over the qkv features, LN after attention, the
        # MLP and LN after it. Parameters stacked over blocks.
        w, b = zip(*(_sonnet_linear(S, qkv) for _ in range(n_blocks)))
        self.qkv_weight, self.qkv_bias = nn.Parameter(torch.stack(w)), nn.Parameter(torch.stack(b))
        self.qkv_norm = nn.Parameter(torch.stack([torch.ones(n_blocks, qkv), torch.zeros(n_blocks, qkv)], 1))
        w, b = zip(*(_sonnet_linear(S, S) for _ in range(n_blocks * n_mlp_layers)))
        self.mlp_weight = nn.Parameter(torch.stack(w).view(n_blocks, n_mlp_layers, S, S))
        self.mlp_bias = nn.Parameter(torch.stack(b).view(n_blocks, n_mlp_layers, S))
        # [block, (attention LN, MLP LN), (scale, offset), S]
        self.block_norm = nn.Parameter(torch.stack([torch.ones(n_blocks, 2, S), torch.zeros(n_blocks, 2, S)], 2))
        gate = S if gate_style == "unit" else 1
        self.gate_input_weight, self.gate_bias = _sonnet_linear(S, 2 * gate)   # from x~_t: [input gate; forget gate]
        self.gate_memory_weight, _ = _sonnet_linear(S, 2 * gate)               # from tanh(M_{t-1})
        self.out_weight, self.out_bias = _sonnet_linear(n_slots * S, d_model)

    def initial_memory(self, device=None, dtype=None) -> torch.Tensor:
        """The paper's M_0 [n_slots, slot_size]: the identity, zero-padded or truncated to slot_size columns."""
        return torch.eye(self.n_slots, self.slot_size, device=device, dtype=dtype)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        m0 = self.initial_memory(device=device, dtype=dtype)
        return State(memory=m0.expand(batch_size, -1, -1).clone())

    def _forward(self, x, state):
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        batch = x.shape[0]
        N, S, H, dk, dv = self.n_slots, self.slot_size, self.n_heads, self.key_size, self.head_size
        gate = S if self.gate_style == "unit" else 1
        qkv_size = H * (2 * dk + dv)
        ops = _Ops(batch * (N + 1) * S * max(qkv_size, S) <= _SMALL)
        p = {name: param.to(work) for name, param in self.named_parameters()}
        # 1/sqrt(key_size) folded into the query part of the qkv LayerNorm's scale and offset (the
        # same as scaling q).
        fold = torch.ones(2 * dk + dv, dtype=work, device=x.device)
        fold[:dk] = dk**-0.5
        qkv_norm = p["qkv_norm"] * fold.repeat(H)
        blocks = [  # per block: (qkv W^T, b, LN scale, offset), (attention LN), (MLP W^T, b per layer), (MLP LN)
            ((p["qkv_weight"][i].T, p["qkv_bias"][i], *qkv_norm[i]), tuple(p["block_norm"][i, 0]),
             [(p["mlp_weight"][i, j].T, p["mlp_bias"][i, j]) for j in range(self.n_mlp_layers)], tuple(p["block_norm"][i, 1]))
            for i in range(self.n_blocks)
        ]

        x_in = F.linear(x.to(work), p["in_weight"], p["in_bias"])  # x~_t: [batch, time, S]
        bias = torch.cat([torch.full((gate,), self.input_bias, dtype=work, device=x.device),
                          torch.full((gate,), self.forget_bias, dtype=work, device=x.device)])
        gate_in = F.linear(x_in, p["gate_input_weight"], p["gate_bias"] + bias)  # [batch, time, 2 * gate]
        # The input row's q, k, v in the first block depend on x~_t alone: every step at once.
        qkv_w, qkv_b, qkv_scale, qkv_offset = blocks[0][0]
        qkv_in = F.layer_norm(x_in @ qkv_w + qkv_b, (qkv_size,), qkv_scale, qkv_offset)
        u_gate, no_bias = p["gate_memory_weight"].T, torch.zeros((), dtype=work, device=x.device)

        memory, memories = state["memory"].to(work), []
        for x_t, qkv_t, g_t in zip(x_in.unbind(1), qkv_in.unbind(1), gate_in.unbind(1)):
            attended = self._attend(memory, x_t[:, None], qkv_t[:, None], blocks, ops)
            i, f = torch.sigmoid(ops.linear(torch.tanh(memory), u_gate, no_bias) + g_t[:, None]).chunk(2, dim=-1)
            memory = torch.addcmul(f * memory, i, torch.tanh(attended))
            memories.append(memory)
        y = F.linear(torch.stack(memories, dim=1).flatten(2), p["out_weight"], p["out_bias"])
        return y.to(dtype), State(memory=memory.to(dtype))

    def _attend(self, memory, x_row, qkv_row, blocks, ops):
        """The attention blocks at one step: rows A = [M_{t-1}; x~_t] through n_blocks of
        LN(A + MHDPA(A)), LN(A + MLP(A)); returns the memory rows M~ [batch, N, S].

        Only the memory rows are kept, so the last block computes queries, residual and MLP for the
        memory rows only (the input row is a key and a value there); the input row's q, k, v in
        the first block are precomputed for every step (``qkv_row``)."""
        N, H, dk = self.n_slots, self.n_heads, self.key_size
        for blk, ((qkv_w, qkv_b, *qkv_norm), attn_norm, mlp, mlp_norm) in enumerate(blocks):
            last = blk == self.n_blocks - 1
            rows = memory if blk == 0 else torch.cat([memory, x_row], dim=1)
            qkv = ops.layer_norm(ops.linear(rows, qkv_w, qkv_b), *qkv_norm)
            if blk == 0:
                qkv = torch.cat([qkv, qkv_row], dim=1)
            qkv = qkv.view(qkv.shape[0], qkv.shape[1], H, -1).transpose(1, 2)  # [batch, H, R, 2 dk + dv]
            q, k, v = qkv[..., :dk], qkv[..., dk:2 * dk], qkv[..., 2 * dk:]
            if last:
                q = q[:, :, :N]
            attended = ops.mix(ops.softmax(ops.scores(q, k)), v)  # [batch, H, R', dv]
            attended = attended.transpose(1, 2).reshape(attended.shape[0], attended.shape[2], -1)
            rows = memory if last else torch.cat([memory, x_row], dim=1)
            rows = ops.layer_norm(rows + attended, *attn_norm)
            hidden = rows
            for layer, (w_t, b) in enumerate(mlp):
                hidden = ops.linear(torch.relu(hidden) if layer else hidden, w_t, b)
            rows = ops.layer_norm(rows + hidden, *mlp_norm)
            memory, x_row = rows[:, :N], rows[:, N:]
        return memory

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_slots={self.n_slots}, slot_size={self.slot_size}, n_heads={self.n_heads}, "
                f"key_size={self.key_size}, n_blocks={self.n_blocks}, gate_style={self.gate_style!r}")
