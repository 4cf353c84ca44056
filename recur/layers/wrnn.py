"""The Wave RNN (Keller & Welling, "Traveling Waves Encode the Recent Past and Enhance Sequence
Learning", ICLR 2024): a ReLU RNN whose hidden state is a set of channels on a 1-D ring and whose
recurrent weight is a circular convolution over the ring, initialised to a shift so that
activity travels around the ring as a wave.

    h_t = sigma(u * h_{t-1} + V x_t + b)        h: [n_channels, n_spatial], * circular conv
    y_t = W_out flatten(h_t) + b_out            back to d_model

u is a Conv1d(n_channels -> n_channels, kernel_size) over the spatial axis with circular padding
kernel_size // 2 on each side (the official code's ``nn.Conv1d(..., padding=k // 2,
padding_mode='circular')``), so position 0 and position n_spatial - 1 are neighbours. V is a dense
encoder d_model -> n_channels * n_spatial (every position may receive input) and W_out a dense
linear readout of the whole flattened ring at every step (the code's ``readout`` on ``hy``).

Initialisation (the authors' code, akandykeller/Wave_RNNs, ``RNN_Cell`` with the settings of all
its wRNN sweeps: ``init='fwd'``, ``solo_init='yes'``, ``act='relu'``, ``ksize=3``):
  * u: the identity over channels (``nn.init.dirac_``) rolled by one tap, so the only non-zero
    tap is kernel[c, c, k // 2 + 1] = 1 and (u * h)[c, j] = h[c, (j + 1) mod n_spatial]: at
    initialisation every channel's activity moves one position towards lower index per step and
    wraps from position 0 to position n_spatial - 1; with zero input a bump goes once round the
    ring every n_spatial steps (the wave that "encodes the recent past": position j of the ring
    holds, before any training, the input injected j steps ago).
  * V ("solo" init): zero except position 0 of every channel, so the input enters the ring at one
    point and is carried around it by the wave. The code sets those weights to 1; its inputs are
    a scalar pixel or a one-hot token, for which 1 gives an injected value of the input's own
    scale. recur's input is a dense d_model vector, so the weights are 1 / sqrt(d_model): the
    injected value sum_i x_i / sqrt(d_model) has unit variance for unit-variance inputs (at
    d_model = 1 this is the code's init). V's bias starts at zero (the code's ``solo_init``).
  * The recurrent bias b (the conv's bias) starts at zero. The code keeps Conv1d's default
    uniform(+-1/sqrt(3 n_channels)) bias; with an exactly norm-preserving shift and ReLU, a
    positive bias is passed on unchanged and added again at every step, so an untrained layer's
    state would grow by b per step without bound (~3e4 after 1e5 steps). Zero keeps the untrained
    layer's state a pure wave of its inputs; b is trainable.
  * W_out: PyTorch's Linear init (the code's ``nn.Linear(n_hid * n_ch, n_out)``).

Sizes (options): ``n_spatial`` (ring length, default d_model: the wave holds the last d_model
inputs before wrapping) and ``n_channels`` (default 4; the paper's tasks use 6 to 32 channels on
rings of 100 to 324 positions). The state is h: n_channels * n_spatial floats.

Nonlinear recurrence: ``recurrent`` mode only. V x_t for every step is one matmul before the loop
and the readout one matmul after it; each step is one gather of every position's kernel_size
neighbours on the ring (the circular padding), one matmul and the nonlinearity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import positive_ints
from recur.registry import register
from recur.state import State

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "identity": None}


@register("wrnn", family="classic",
          paper="Keller & Welling, Traveling Waves Encode the Recent Past and Enhance Sequence Learning (ICLR 2024)")
class WaveRNN(Mixer):
    """Wave RNN: a ReLU RNN on a ring of channels whose recurrence is a shift-initialised circular conv.

    h_t = relu(u * h_{t-1} + V x_t + b) with h [n_channels, n_spatial] and * a circular
    convolution over the ring (u initialised to a one-position shift); y_t = W_out flatten(h_t).
    Keller & Welling, "Traveling Waves Encode the Recent Past and Enhance Sequence Learning" (ICLR 2024).
    """

    modes = ("recurrent",)
    state_formula = "n_channels * n_spatial"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_channels: int = 4,
        n_spatial: int | None = None,
        kernel_size: int = 3,
        activation: str = "relu",
    ):
        super().__init__(d_model, mode)
        n_spatial = d_model if n_spatial is None else n_spatial
        positive_ints("wrnn", n_channels=n_channels, n_spatial=n_spatial, kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"wrnn: kernel_size must be odd (circular padding kernel_size // 2 on each side "
                             f"keeps the ring's length), got {kernel_size}")
        if kernel_size // 2 >= n_spatial:
            raise ValueError(f"wrnn: kernel_size // 2 = {kernel_size // 2} must be smaller than n_spatial = {n_spatial}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"wrnn: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.n_channels, self.n_spatial, self.kernel_size, self.activation = n_channels, n_spatial, kernel_size, activation

        n_hidden = n_channels * n_spatial
        # Encoder V: [n_channels * n_spatial, d_model], rows channel-major (row c * n_spatial + j).
        self.in_weight = nn.Parameter(torch.zeros(n_hidden, d_model))
        self.in_bias = nn.Parameter(torch.zeros(n_hidden))
        # Recurrent circular convolution u: [out_channels, in_channels, kernel_size], bias b.
        self.conv_weight = nn.Parameter(torch.zeros(n_channels, n_channels, kernel_size))
        self.conv_bias = nn.Parameter(torch.zeros(n_channels))
        readout = nn.Linear(n_hidden, d_model)
        self.out_weight, self.out_bias = readout.weight, readout.bias
        self.reset_wave()

    @torch.no_grad()
    def reset_wave(self) -> None:
        """The paper's initialisation of V, u and b (see the module docstring)."""
        self.in_weight.zero_()
        self.in_weight.view(self.n_channels, self.n_spatial, self.d_model)[:, 0] = 1.0 / math.sqrt(self.d_model)
        self.in_bias.zero_()
        self.conv_weight.zero_()
        channels = torch.arange(self.n_channels)
        self.conv_weight[channels, channels, self.kernel_size // 2 + 1] = 1.0  # dirac, rolled by one tap
        self.conv_bias.zero_()

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(h=torch.zeros(batch_size, self.n_channels, self.n_spatial, device=device, dtype=dtype))

    def _forward(self, x, state):
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        batch, time = x.shape[:2]
        C, N, k, p = self.n_channels, self.n_spatial, self.kernel_size, self.kernel_size // 2
        # The loop works position-major, h as [batch * n_spatial, n_channels], so that the circular
        # convolution is one gather of each position's k neighbours and one matmul (conv1d itself
        # costs far more per call than its arithmetic on such small rings).
        b = (self.in_bias.to(work).view(C, N) + self.conv_bias.to(work)[:, None]).reshape(-1)
        u = F.linear(x.to(work).transpose(0, 1), self.in_weight.to(work), b)  # V x_t + b: [time, batch, C * N]
        u = rearrange(u, "t b (c n) -> t (b n) c", c=C)
        # neighbours[j] = ((j + i - p) mod N for i < k): conv1d's taps over the circularly padded ring.
        neighbours = ((torch.arange(N, device=x.device)[:, None] + torch.arange(k, device=x.device) - p) % N).reshape(-1)
        kernel = rearrange(self.conv_weight.to(work), "d c k -> (k c) d")
        act = _ACTIVATIONS[self.activation]
        h, hs = rearrange(state["h"].to(work), "b c n -> b n c"), []
        for u_t in u.unbind(0):
            windows = h.index_select(1, neighbours).view(batch * N, k * C)
            h = torch.addmm(u_t, windows, kernel)
            if act is not None:
                h = act(h)
            h = h.view(batch, N, C)
            hs.append(h)
        hs = torch.stack(hs, dim=1).flatten(2)  # [batch, time, N * C], position-major
        readout = rearrange(self.out_weight.to(work), "d (c n) -> d (n c)", c=C)
        y = F.linear(hs, readout, self.out_bias.to(work))
        return y.to(dtype), State(h=rearrange(h, "b n c -> b c n").to(dtype))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_channels={self.n_channels}, n_spatial={self.n_spatial}, "
                f"kernel_size={self.kernel_size}, activation={self.activation!r}")
