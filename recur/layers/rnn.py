"""Classic nonlinear recurrent cells: Elman (tanh) RNN, LSTM and GRU.

Nonlinear recurrences have no parallel form: each supports ``recurrent`` mode only.
The input projections for all time steps are one matmul; the loop only does the
recurrent matmul and the gate nonlinearities.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.registry import register
from recur.state import State


@register("elman", family="classic", paper="Elman, Finding Structure in Time (1990)")
class Elman(Mixer):
    """Elman (simple tanh) RNN.

    h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh);  y_t = h_t.
    Parameters are laid out as ``torch.nn.RNN`` (uniform(-1/sqrt(d), 1/sqrt(d)) init).
    """

    modes = ("recurrent",)
    state_formula = "d_model"

    def __init__(self, d_model: int, mode: str | None = None):
        super().__init__(d_model, mode)
        d = d_model
        self.weight_ih = nn.Parameter(torch.empty(d, d))
        self.weight_hh = nn.Parameter(torch.empty(d, d))
        self.bias_ih = nn.Parameter(torch.empty(d))
        self.bias_hh = nn.Parameter(torch.empty(d))
        bound = 1.0 / math.sqrt(d)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(h=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))

    def _forward(self, x, state):
        u = x @ self.weight_ih.T + (self.bias_ih + self.bias_hh)  # [batch, time, d]
        h, ys = state["h"], []
        w_hh = self.weight_hh.T
        for u_t in u.unbind(1):  # unbind: indexing u[:, t] would make backward quadratic in T
            h = torch.tanh(u_t + h @ w_hh)
            ys.append(h)
        return torch.stack(ys, dim=1), State(h=h)


class _TorchLayoutCell(Mixer):
    """Shared by LSTM and GRU: the ``torch.nn.LSTM`` / ``torch.nn.GRU`` parameter layout
    (``gates`` blocks of d_model rows, torch's gate order), loading from torch and state conversion."""

    modes = ("recurrent",)
    gates: int  # gate blocks stacked in weight_ih / weight_hh
    state_keys: tuple[str, ...]  # State entries, in torch's hx order
    torch_class: type[nn.RNNBase]

    def __init__(self, d_model: int, mode: str | None = None):
        super().__init__(d_model, mode)
        d, g = d_model, self.gates
        self.weight_ih = nn.Parameter(torch.empty(g * d, d))
        self.weight_hh = nn.Parameter(torch.empty(g * d, d))
        self.bias_ih = nn.Parameter(torch.empty(g * d))
        self.bias_hh = nn.Parameter(torch.empty(g * d))
        bound = 1.0 / math.sqrt(d)  # torch's init
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State({k: torch.zeros(batch_size, self.d_model, device=device, dtype=dtype) for k in self.state_keys})

    @classmethod
    def from_torch(cls, module: nn.RNNBase, **options):
        """A layer with the weights of a one-layer unidirectional ``torch_class`` module (copied).

        ``batch_first`` may be either: weights do not depend on it, and this layer is batch-first.
        A module built with ``bias=False`` loads zero biases (trainable here). Other options
        (e.g. ``mode``) are passed to the constructor. The result has the module's dtype and device.
        """
        name = cls.torch_class.__name__
        if not isinstance(module, cls.torch_class):
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{name}, got {type(module).__name__}")
        if module.num_layers != 1:
            raise ValueError(f"{cls.__name__}.from_torch needs a one-layer torch.nn.{name}, got num_layers={module.num_layers}; stack one layer per module instead")
        if module.bidirectional:
            raise ValueError(f"{cls.__name__}.from_torch needs a unidirectional torch.nn.{name} (a causal mixer cannot read the future), got bidirectional=True")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"{cls.__name__}.from_torch needs proj_size=0 (y_t = h_t), got proj_size={module.proj_size}")
        if module.input_size != module.hidden_size:
            raise ValueError(
                f"{cls.__name__}.from_torch needs input_size == hidden_size (both are d_model here), "
                f"got input_size={module.input_size}, hidden_size={module.hidden_size}"
            )
        ref = module.weight_ih_l0
        layer = cls(module.hidden_size, **options).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            layer.weight_ih.copy_(module.weight_ih_l0)
            layer.weight_hh.copy_(module.weight_hh_l0)
            for ours in ("bias_ih", "bias_hh"):
                theirs = getattr(module, f"{ours}_l0", None) if module.bias else None
                getattr(layer, ours).copy_(theirs if theirs is not None else torch.zeros_like(getattr(layer, ours)))
        return layer

    def state_to_torch(self, state: State):
        """This layer's State as torch's ``hx``: tensors [num_layers=1, batch, hidden], in torch's order."""
        hx = tuple(rearrange(state[k], "b h -> 1 b h") for k in self.state_keys)
        return hx if len(hx) > 1 else hx[0]

    def state_from_torch(self, hx) -> State:
        """torch's ``hx`` (tensors [1, batch, hidden], as returned by the torch module) as this layer's State."""
        tensors = (hx,) if isinstance(hx, torch.Tensor) else tuple(hx)
        if len(tensors) != len(self.state_keys) or not all(isinstance(t, torch.Tensor) for t in tensors):
            layout = " and ".join(f"{k}_0" for k in self.state_keys)
            raise ValueError(f"{self.name}: torch's hx is {layout}, tensors of shape [1, batch, {self.d_model}]; got {len(tensors)} entries")
        for k, t in zip(self.state_keys, tensors):
            if t.ndim != 3 or t.shape[0] != 1 or t.shape[2] != self.d_model:
                raise ValueError(f"{self.name}: {k}_0 must have shape [1, batch, {self.d_model}] (one layer, one direction), got {tuple(t.shape)}")
        return State({k: rearrange(t, "1 b h -> b h") for k, t in zip(self.state_keys, tensors)})


@register("lstm", family="classic", paper="Hochreiter & Schmidhuber, Long Short-Term Memory (1997); Gers et al., Learning to Forget (2000)")
class LSTM(_TorchLayoutCell):
    """Long short-term memory with a forget gate.

    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) (torch's gate order);
    c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t);  y_t = h_t.
    Hochreiter & Schmidhuber, "Long Short-Term Memory" (1997), forget gate from Gers et al.,
    "Learning to Forget" (2000). Parameters are laid out as ``torch.nn.LSTM``; load one with
    ``LSTM.from_torch``, convert states with ``state_to_torch`` / ``state_from_torch`` ((h_0, c_0)).

    ``forget_bias`` (default 1.0): the forget gate's total bias starts at this value
    (bias_ih = forget_bias, bias_hh = 0 on the f block) so that the cell remembers by default
    (Gers et al. 2000; Jozefowicz et al. 2015); ``None`` keeps torch's uniform init everywhere.
    """

    gates = 4
    state_keys = ("h", "c")
    state_formula = "2 * d_model"
    torch_class = nn.LSTM

    def __init__(self, d_model: int, mode: str | None = None, forget_bias: float | None = 1.0):
        super().__init__(d_model, mode)
        if forget_bias is not None:
            forget = slice(d_model, 2 * d_model)
            with torch.no_grad():
                self.bias_ih[forget] = forget_bias
                self.bias_hh[forget] = 0.0

    def _forward(self, x, state):
        u = x @ self.weight_ih.T + (self.bias_ih + self.bias_hh)  # [batch, time, 4d]
        h, c, ys = state["h"], state["c"], []
        w_hh = self.weight_hh.T
        for u_t in u.unbind(1):
            i, f, g, o = torch.addmm(u_t, h, w_hh).chunk(4, dim=-1)
            c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
            h = torch.sigmoid(o) * torch.tanh(c)
            ys.append(h)
        return torch.stack(ys, dim=1), State(h=h, c=c)


@register("gru", family="classic", paper="Cho et al., Learning Phrase Representations using RNN Encoder-Decoder (2014)")
class GRU(_TorchLayoutCell):
    """Gated recurrent unit.

    r, z = sigmoid(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t-1} + b_h{r,z});
    n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn));  h_t = (1 - z) * n + z * h_{t-1};  y_t = h_t.
    Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for Statistical
    Machine Translation" (2014), in torch's variant (reset gate applied after W_hn).
    Parameters are laid out as ``torch.nn.GRU`` (gate order r, z, n); load one with
    ``GRU.from_torch``, convert states with ``state_to_torch`` / ``state_from_torch`` (h_0).
    """

    gates = 3
    state_keys = ("h",)
    state_formula = "d_model"
    torch_class = nn.GRU

    def _forward(self, x, state):
        d = self.d_model
        u = x @ self.weight_ih.T + self.bias_ih  # [batch, time, 3d]
        h, ys = state["h"], []
        w_hh, b_hh = self.weight_hh.T, self.bias_hh
        for u_t in u.unbind(1):
            v_t = torch.addmm(b_hh, h, w_hh)
            r, z = torch.sigmoid(u_t[:, : 2 * d] + v_t[:, : 2 * d]).chunk(2, dim=-1)
            n = torch.tanh(torch.addcmul(u_t[:, 2 * d :], r, v_t[:, 2 * d :]))
            h = torch.lerp(n, h, z)  # (1 - z) * n + z * h
            ys.append(h)
        return torch.stack(ys, dim=1), State(h=h)
