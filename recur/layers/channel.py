"""Channel mixers: the per-position half of a block (``Block(mixer, channel, norm)``).

    ch = CHANNEL_MIXERS.get("swiglu").cls(d_model=64)
    y, state = ch(x, state=None)     # x: [batch, time, d_model]; state: State() unless it carries one

A channel mixer mixes features within a position. Most have no memory (SwiGLU, GELU MLP);
RWKV's channel mix reads the previous token too (token shift), so it carries that one vector
as its state and obeys the same carry contract as a mixer: carrying the state across calls
equals one call on the concatenated input; ``resets`` (packed documents) zero the previous
token at a document's first position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.common import layer_depth, positive_int, rwkv_ramps, token_shift
from recur.registry import CHANNEL_MIXERS
from recur.state import State

RWKV4_PAPER = "Peng et al., RWKV: Reinventing RNNs for the Transformer Era (2023)"


class ChannelMixer(nn.Module):
    """Base class: ``forward(x, state) -> (y, state)``; stateless ones return an empty State."""

    name: str = "channel"
    stateful: bool = False  # True if init_state holds tensors that carry across calls

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return State()

    def state_size(self) -> int:
        return self.init_state(1, device="meta", dtype=torch.float32).num_floats()

    def forward(self, x: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """``resets`` (packed documents) only matter to a channel mixer with a state."""
        return self.mix(x), State()

    def mix(self, x: torch.Tensor) -> torch.Tensor:  # stateless channel mixers implement this
        raise TypeError(f"{type(self).__name__} carries a state: call it as ch(x, state)")


@CHANNEL_MIXERS.register("swiglu", paper="Shazeer, GLU Variants Improve Transformer (2020)")
class SwiGLU(ChannelMixer):
    """SwiGLU MLP: W_down (silu(W_a x) * W_b x), hidden width 2/3 * ratio * d (rounded to 8) so that
    it has the parameters of a ratio-x MLP."""

    def __init__(self, d_model: int, ratio: float = 4.0):
        super().__init__(d_model)
        hidden = max(8, int(round(2 * ratio * d_model / 3 / 8)) * 8)
        self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def mix(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


@CHANNEL_MIXERS.register("gelu", paper="Vaswani et al., Attention Is All You Need (2017); Hendrycks & Gimpel, GELUs (2016)")
class GeluMLP(ChannelMixer):
    """The Transformer's MLP with GELU: W_down gelu(W_up x), hidden width ratio * d."""

    def __init__(self, d_model: int, ratio: float = 4.0):
        super().__init__(d_model)
        hidden = int(ratio * d_model)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def mix(self, x):
        return self.down(F.gelu(self.up(x)))


@CHANNEL_MIXERS.register("rwkv4", paper=RWKV4_PAPER)
class RWKVChannelMix(ChannelMixer):
    """RWKV-4 channel mixing: a token-shifted, receptance-gated squared-ReLU MLP.

        r_t = W_r (mu_r x_t + (1 - mu_r) x_{t-1}),   k_t = W_k (mu_k x_t + (1 - mu_k) x_{t-1})
        y_t = sigmoid(r_t) * W_v (relu(k_t)^2)
    Its memory is the previous input (state: shift [batch, d]). A faithful RWKV-4 language model
    is ``CausalLM(pattern="rwkv4", mlp="rwkv4")``: every block has RWKV-4 time mixing then this
    channel mixing (recur's blocks use RMSNorm where RWKV-4 uses LayerNorm, unless ``norm="layernorm"``).

    Initialisation (official RWKV-4 code): mu_k = mu_r = (i / d)^r1 with r1 = 1 - layer_idx /
    n_layers; hidden width 4 d; W_k orthogonal with gain sqrt(4 d / d) = 2; W_r = 0. The official
    code zeroes W_v too (a lone layer's output would be identically zero); here W_v is orthogonal
    (gain 1) unless ``zero_init_output=True``.
    """

    stateful = True

    def __init__(self, d_model: int, ratio: float = 4.0, zero_init_output: bool = False,
                 layer_idx: int | None = None, n_layers: int | None = None):
        super().__init__(d_model)
        hidden = int(ratio * d_model)
        positive_int("hidden width (ratio * d_model)", hidden)
        _, r1, ramp = rwkv_ramps(d_model, *layer_depth("rwkv4 channel mix", layer_idx, n_layers))
        d = d_model
        self.d_hidden = hidden
        with torch.no_grad():
            self.mix_k = nn.Parameter((ramp**r1).float())
            self.mix_r = nn.Parameter((ramp**r1).float())
        self.key = nn.Linear(d, hidden, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(hidden, d, bias=False)
        nn.init.orthogonal_(self.key.weight, gain=math.sqrt(hidden / d))
        nn.init.zeros_(self.receptance.weight)
        if zero_init_output:
            nn.init.zeros_(self.value.weight)
        else:
            nn.init.orthogonal_(self.value.weight)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(shift=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))

    def forward(self, x, state=None, resets=None):
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        x_prev, last = token_shift(x, state["shift"], resets)
        k = self.key(x * self.mix_k + x_prev * (1 - self.mix_k))
        r = self.receptance(x * self.mix_r + x_prev * (1 - self.mix_r))
        return torch.sigmoid(r) * self.value(torch.relu(k) ** 2), State(shift=last)


def build_channel(name: str | None, d_model: int, layer_idx: int = 0, n_layers: int = 1, **options) -> ChannelMixer | None:
    """The channel mixer registered as ``name`` (None: no channel mixer); depth arguments only
    reach constructors that take them."""
    if name is None:
        return None
    cls = CHANNEL_MIXERS.get(name).cls
    return cls(d_model, **depth_kwargs(cls, layer_idx, n_layers), **options)


def depth_kwargs(cls: type, layer_idx: int, n_layers: int) -> dict[str, int]:
    """``layer_idx`` and ``n_layers`` for a component whose constructor takes them (depth-dependent
    initialisation: HGRN's forget-gate bound, RWKV's ramps); nothing for the others."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {"layer_idx": layer_idx, "n_layers": n_layers} if {"layer_idx", "n_layers"} <= set(params) else {}
