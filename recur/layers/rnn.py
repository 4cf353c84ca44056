"""Classic nonlinear recurrent cells: Elman (tanh) RNN, LSTM and GRU.

Nonlinear recurrences have no parallel form: each supports ``recurrent`` mode only.
The input projections for all time steps are one matmul; the loop only does the
recurrent matmul and the gate nonlinearities. LSTM and GRU also stack layers, run
bidirectionally (an encoder, like torch's) and split W_hh into heads (block-diagonal,
FlashRNN); every direction and head of a layer steps in one batched matmul, in the fused
loops of ``recur.ops.cells`` (forward without an autograd graph, hand-written BPTT).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.ops.cells import gru_sequence, lstm_sequence
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
    """Shared by LSTM and GRU: stacked layers, two directions and head-wise (block-diagonal)
    recurrence in ``torch.nn.LSTM`` / ``torch.nn.GRU``'s layout, loading from torch and state conversion.

    Options (keyword-only):
      ``num_layers`` (1): stacked layers; layer l > 0 reads layer l - 1's output, as torch's.
      ``bidirectional`` (False): every layer runs a forward direction over x and a backward
        direction over x reversed in time (then reversed back), each with hidden size
        d_model // 2, concatenated [forward, backward] to d_model (``torch.nn.LSTM(d, d // 2,
        bidirectional=True)``). Such a layer reads the future: ``causal`` is False (an encoder).
      ``n_heads`` (None = 1, dense): head-wise recurrence as in FlashRNN (Pöppel et al.,
        "FlashRNN: Optimizing Traditional RNNs on Modern Hardware", 2024) and xLSTM's sLSTM: the
        hidden units of each direction split into n_heads heads of head_dim units and W_hh is
        block-diagonal, so the gates of head j read only head j's previous hidden state (n_heads
        small RNNs side by side; the input projection W_ih stays dense and mixes heads).

    Parameters, entry k = layer * num_directions + direction (torch's ``_l{layer}[_reverse]``):
      weight_ih [L*dirs, gates*hidden, d_model]   torch's weight_ih (every layer's input is
                                                  d_model wide: hidden * num_directions = d_model)
      weight_hh [L*dirs, n_heads, gates*head_dim, head_dim]   the diagonal blocks of W_hh only;
                                                  with n_heads = 1 it is torch's weight_hh
      bias_ih, bias_hh [L*dirs, gates*hidden]
    Rows are gate-major as in torch, then head, then unit: row (gate, head, unit) of W_hh's
    block-diagonal expansion is weight_hh[k, head, gate * head_dim + unit].

    Initialisation: torch's uniform(-1/sqrt(hidden), 1/sqrt(hidden)) for W_ih and biases; the
    recurrent blocks use uniform(-1/sqrt(head_dim), 1/sqrt(head_dim)) (torch's rule for an RNN of
    head_dim units: each gate's recurrent pre-activation keeps the dense layer's variance; with
    n_heads = 1 this is torch's init).

    State: torch's hx batch-first, ``h`` (and ``c``) of shape [batch, num_layers * num_directions,
    hidden] in torch's layer/direction order. A bidirectional layer returns torch's h_n: the forward
    direction after the last token, the backward direction after reading back to the first token;
    a given state is torch's h_0 (each direction starts from its entry).
    """

    modes = ("recurrent",)
    gates: int  # gate blocks stacked in weight_ih / weight_hh
    state_keys: tuple[str, ...]  # State entries, in torch's hx order
    torch_class: type[nn.RNNBase]

    def __init__(self, d_model: int, mode: str | None = None, *, num_layers: int = 1,
                 bidirectional: bool = False, n_heads: int | None = None):
        super().__init__(d_model, mode)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"{self.name}: num_layers must be an int >= 1, got {num_layers!r}")
        if not isinstance(bidirectional, bool):
            raise ValueError(f"{self.name}: bidirectional must be True or False, got {bidirectional!r}")
        if bidirectional and d_model % 2:
            raise ValueError(f"{self.name}: bidirectional=True gives each direction d_model // 2 hidden units "
                             f"(concatenated back to d_model), so d_model must be even, got d_model={d_model}")
        dirs = 2 if bidirectional else 1
        hidden = d_model // dirs
        heads = 1 if n_heads is None else n_heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or hidden % heads:
            raise ValueError(f"{self.name}: n_heads must be None or an int >= 1 dividing the hidden size "
                             f"{hidden} (d_model={d_model}{', halved per direction' if bidirectional else ''}), got {n_heads!r}")
        self.num_layers, self.num_directions, self.bidirectional = num_layers, dirs, bidirectional
        self.hidden_size, self.n_heads, self.head_dim = hidden, heads, hidden // heads
        if bidirectional:
            self.causal = False
        g, n = self.gates, num_layers * dirs
        self.weight_ih = nn.Parameter(torch.empty(n, g * hidden, d_model))
        self.weight_hh = nn.Parameter(torch.empty(n, heads, g * self.head_dim, self.head_dim))
        self.bias_ih = nn.Parameter(torch.empty(n, g * hidden))
        self.bias_hh = nn.Parameter(torch.empty(n, g * hidden))
        for p in (self.weight_ih, self.bias_ih, self.bias_hh):
            nn.init.uniform_(p, -1.0 / math.sqrt(hidden), 1.0 / math.sqrt(hidden))  # torch's init
        nn.init.uniform_(self.weight_hh, -1.0 / math.sqrt(self.head_dim), 1.0 / math.sqrt(self.head_dim))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        shape = (batch_size, self.num_layers * self.num_directions, self.hidden_size)
        return State({k: torch.zeros(shape, device=device, dtype=dtype) for k in self.state_keys})

    # ----------------------------------------------------------------- compute
    def _forward(self, x, state):
        dirs, heads, G = self.num_directions, self.n_heads, self.gates
        streams = "(r h) b d"  # the loop runs dirs * heads small RNNs side by side, batched
        inp, finals = x, {k: [] for k in self.state_keys}
        for layer in range(self.num_layers):
            k = slice(layer * dirs, (layer + 1) * dirs)
            # Input projections of every step and direction in one batched matmul, bias included,
            # written time-major so that the loop's layout is a view of it (for one direction and
            # head; a copy otherwise). The backward direction reads x reversed in time.
            xs = inp[None] if dirs == 1 else torch.stack([inp, inp.flip(1)])  # [dirs, batch, time, d_model]
            xs = rearrange(xs, "r b t e -> r (t b) e")
            u = torch.baddbmm(self._input_bias(k)[:, None], xs, self.weight_ih[k].transpose(1, 2))
            u = rearrange(u, "r (t b) (g h d) -> t (r h) b (g d)", b=x.shape[0], g=G, h=heads)
            w_hh = rearrange(self.weight_hh[k], "r h e d -> (r h) d e")  # blocks, transposed: h @ w_hh
            b_hh = rearrange(self.bias_hh[k], "r (g h d) -> (r h) 1 (g d)", g=G, h=heads)
            s0 = [rearrange(state[key][:, k], f"b r (h d) -> {streams}", h=heads) for key in self.state_keys]
            ys, last = self._loop(u, w_hh, b_hh, *s0)
            y = rearrange(ys, f"t {streams} -> r b t (h d)", r=dirs)
            # squeeze, not y[0]: the backward of a select zero-fills and copies a full-size gradient
            inp = y.squeeze(0) if dirs == 1 else torch.cat([y[0], y[1].flip(1)], dim=-1)  # [batch, time, d_model]
            for key, s in zip(self.state_keys, last):
                finals[key].append(rearrange(s, f"{streams} -> b r (h d)", r=dirs))
        return inp, State({key: torch.cat(v, dim=1) for key, v in finals.items()})

    def _input_bias(self, k: slice) -> torch.Tensor:
        """The bias folded into the input projection ([dirs, gates * hidden])."""
        return self.bias_ih[k] + self.bias_hh[k]

    @abstractmethod
    def _loop(self, u, w_hh, b_hh, *states):
        """The recurrence over time. u [time, streams, batch, gates*head_dim] (input projections, a
        temporary the loop may overwrite), w_hh [streams, head_dim, gates*head_dim], b_hh
        [streams, 1, gates*head_dim], states [streams, batch, head_dim]; returns (h_t for every t
        [time, streams, batch, head_dim], final states). The fused loops of ``recur.ops.cells``
        (hand-written BPTT)."""

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_layers={self.num_layers}, bidirectional={self.bidirectional}, "
                f"n_heads={self.n_heads}")

    # ------------------------------------------------------------------- torch
    @classmethod
    def from_torch(cls, module: nn.RNNBase, **options):
        """A layer with the weights of a ``torch_class`` module (copied), any number of layers,
        uni- or bidirectional: d_model = hidden_size * num_directions, which must equal input_size.

        ``batch_first`` may be either: weights do not depend on it, and this layer is batch-first.
        A module built with ``bias=False`` loads zero biases (trainable here). recur applies no
        dropout between layers: the layer equals the module in eval mode. Other options (e.g.
        ``mode``) are passed to the constructor; torch has no head-wise layout, so ``n_heads`` must
        be None or 1. The result has the module's dtype and device.
        """
        name = cls.torch_class.__name__
        if not isinstance(module, cls.torch_class):
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{name}, got {type(module).__name__}")
        if options.get("n_heads") not in (None, 1):
            raise ValueError(f"{cls.__name__}.from_torch: torch.nn.{name} has a dense W_hh; a head-wise layer "
                             f"(n_heads={options['n_heads']}) cannot load it. Use n_heads=None")
        taken = sorted({"num_layers", "bidirectional"} & set(options))
        if taken:
            raise TypeError(f"{cls.__name__}.from_torch takes {', '.join(taken)} from the module; do not pass them")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"{cls.__name__}.from_torch needs proj_size=0 (y_t = h_t), got proj_size={module.proj_size}")
        dirs = 2 if module.bidirectional else 1
        if module.input_size != dirs * module.hidden_size:
            raise ValueError(
                f"{cls.__name__}.from_torch needs input_size == hidden_size * num_directions (both are d_model "
                f"here, so layers stack), got input_size={module.input_size}, hidden_size={module.hidden_size}, "
                f"bidirectional={module.bidirectional}"
            )
        ref = module.weight_ih_l0
        layer = cls(dirs * module.hidden_size, num_layers=module.num_layers, bidirectional=module.bidirectional,
                    **options).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for i in range(module.num_layers):
                for r in range(dirs):
                    k, suffix = i * dirs + r, f"_l{i}" + ("_reverse" if r else "")
                    layer.weight_ih[k].copy_(getattr(module, f"weight_ih{suffix}"))
                    layer.weight_hh[k, 0].copy_(getattr(module, f"weight_hh{suffix}"))
                    for ours in ("bias_ih", "bias_hh"):
                        theirs = getattr(module, f"{ours}{suffix}") if module.bias else None
                        getattr(layer, ours)[k].copy_(theirs if theirs is not None else torch.zeros_like(getattr(layer, ours)[k]))
        return layer

    def state_to_torch(self, state: State):
        """This layer's State as torch's ``hx``: tensors [num_layers * num_directions, batch, hidden], in torch's order."""
        hx = tuple(rearrange(state[k], "b n h -> n b h").contiguous() for k in self.state_keys)
        return hx if len(hx) > 1 else hx[0]

    def state_from_torch(self, hx) -> State:
        """torch's ``hx`` (tensors [num_layers * num_directions, batch, hidden], as the torch module returns) as this layer's State."""
        tensors = (hx,) if isinstance(hx, torch.Tensor) else tuple(hx)
        n, hidden = self.num_layers * self.num_directions, self.hidden_size
        expected = f"[num_layers * num_directions={n}, batch, hidden={hidden}]"
        if len(tensors) != len(self.state_keys) or not all(isinstance(t, torch.Tensor) for t in tensors):
            layout = " and ".join(f"{k}_0" for k in self.state_keys)
            raise ValueError(f"{self.name}: torch's hx is {layout}, tensors of shape {expected}; got {len(tensors)} entries")
        for k, t in zip(self.state_keys, tensors):
            if t.ndim != 3 or t.shape[0] != n or t.shape[2] != hidden:
                raise ValueError(f"{self.name}: {k}_0 must have shape {expected}, got {tuple(t.shape)}")
        return State({k: rearrange(t, "n b h -> b n h") for k, t in zip(self.state_keys, tensors)})


@register("lstm", family="classic", paper="Hochreiter & Schmidhuber, Long Short-Term Memory (1997); Gers et al., Learning to Forget (2000)")
class LSTM(_TorchLayoutCell):
    """Long short-term memory with a forget gate.

    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) (torch's gate order);
    c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t);  y_t = h_t.
    Hochreiter & Schmidhuber, "Long Short-Term Memory" (1997), forget gate from Gers et al.,
    "Learning to Forget" (2000). Parameters are laid out as ``torch.nn.LSTM``; load one with
    ``LSTM.from_torch``, convert states with ``state_to_torch`` / ``state_from_torch`` ((h_0, c_0)).
    ``num_layers``, ``bidirectional`` and ``n_heads`` (head-wise, block-diagonal W_hh) as in
    ``_TorchLayoutCell``; the state is h and c, each [batch, num_layers * num_directions, hidden].

    ``forget_bias`` (default 1.0): the forget gate's total bias starts at this value in every layer
    and direction (bias_ih = forget_bias, bias_hh = 0 on the f block) so that the cell remembers by
    default (Gers et al. 2000; Jozefowicz et al. 2015); ``None`` keeps torch's uniform init everywhere.
    """

    gates = 4
    state_keys = ("h", "c")
    state_formula = "2 * num_layers * num_directions * hidden_size"
    torch_class = nn.LSTM

    def __init__(self, d_model: int, mode: str | None = None, forget_bias: float | None = 1.0, *,
                 num_layers: int = 1, bidirectional: bool = False, n_heads: int | None = None):
        super().__init__(d_model, mode, num_layers=num_layers, bidirectional=bidirectional, n_heads=n_heads)
        if forget_bias is not None:
            forget = slice(self.hidden_size, 2 * self.hidden_size)
            with torch.no_grad():
                self.bias_ih[:, forget] = forget_bias
                self.bias_hh[:, forget] = 0.0

    def _forward(self, x, state):
        if self._torch_kernel_applies(x):
            return self._forward_torch(x, state)
        return super()._forward(x, state)

    def _torch_kernel_applies(self, x: torch.Tensor) -> bool:
        """True where torch's own fused LSTM (``torch.lstm``, what torch.nn.LSTM calls; oneDNN's RNN
        primitive for CPU float32) computes this layer: dense W_hh (n_heads = 1), a CPU tensor of
        float32 or float64, outside torch.compile's tracing. The layer is in torch's layout, so the
        equations are the same; head-wise layers, 16-bit floats and compiled graphs take our loop.
        Packed input reaches it per segment (the base class cuts the call at each reset)."""
        return (self.n_heads == 1 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and not torch.compiler.is_compiling())

    def _forward_torch(self, x, state):
        # torch's flat weights, layer by layer and direction by direction: views of ours, so the
        # gradients flow into weight_ih / weight_hh / bias_ih / bias_hh
        flat = [t for k in range(self.num_layers * self.num_directions)
                for t in (self.weight_ih[k], self.weight_hh[k, 0], self.bias_ih[k], self.bias_hh[k])]
        hx = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        # train: keep oneDNN's workspace for a backward (its inference kind has none); no dropout
        y, h, c = torch.lstm(x, hx, flat, True, self.num_layers, 0.0, torch.is_grad_enabled(),
                             self.bidirectional, True)
        return y, State(h=h.transpose(0, 1), c=c.transpose(0, 1))

    def _loop(self, u, w_hh, b_hh, h, c):
        ys, h, c = lstm_sequence(u, w_hh, h, c, overwrite_u=True)  # b_hh is folded into u
        return ys, (h, c)


@register("gru", family="classic", paper="Cho et al., Learning Phrase Representations using RNN Encoder-Decoder (2014)")
class GRU(_TorchLayoutCell):
    """Gated recurrent unit.

    r, z = sigmoid(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t-1} + b_h{r,z});
    n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn));  h_t = (1 - z) * n + z * h_{t-1};  y_t = h_t.
    Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for Statistical
    Machine Translation" (2014), in torch's variant (reset gate applied after W_hn).
    Parameters are laid out as ``torch.nn.GRU`` (gate order r, z, n); load one with
    ``GRU.from_torch``, convert states with ``state_to_torch`` / ``state_from_torch`` (h_0).
    ``num_layers``, ``bidirectional`` and ``n_heads`` (head-wise, block-diagonal W_hh) as in
    ``_TorchLayoutCell``; the state is h [batch, num_layers * num_directions, hidden].
    """

    gates = 3
    state_keys = ("h",)
    state_formula = "num_layers * num_directions * hidden_size"
    torch_class = nn.GRU

    def _input_bias(self, k):
        return self.bias_ih[k]  # b_hn sits inside r * (W_hn h + b_hn): b_hh stays in the loop

    def _loop(self, u, w_hh, b_hh, h):
        ys, h = gru_sequence(u, w_hh, b_hh, h, overwrite_u=True)
        return ys, (h,)
