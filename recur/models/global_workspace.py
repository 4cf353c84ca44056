"""``global_workspace``: specialised modules on a shared workspace, an LSTM controller routing
information between them by a gate at each of ``max_steps`` internal steps (Chateau-Laurent &
VanRullen, "Learning to Chain Operations by Routing Information Through a Global Workspace",
2025; the first, hand-designed version: modules on one-hot digit representations).

The workspace w is a distribution over the vocabulary's ids read as values (slot v holds the
number v; ``chain_addition`` writes the value v as token v). At every position t a causal encoder
(any registered mixer, a ``Backbone``) reads the prefix, u_t = norm(h_t); then, per position:

    w_0 = uniform (the empty workspace),  (c_0, m_0) = 0
    for k = 1 .. K (K = max_steps):
        c_k, m_k = LSTM([w_{k-1}, u_t], (c_{k-1}, m_{k-1}))        the controller reads the workspace
        g_k = gate(W_g c_k + b_g)               over (Input, Increment, Output), sums to one
        w_k = g_k,in  * Input(u_t)                                 Input: reads the addend into the workspace
            + g_k,inc * Increment(w_{k-1})                         Increment: adds one
            + g_k,out * w_{k-1}                                    Output: broadcasts the workspace, unchanged
    logits_t = log w_K                          the Output module's read-out of the final workspace

Modules:

* Input(u) = softmax(W_in u + b_in): the addend read from the encoder's state into a one-hot-like
  value. The paper's hand-designed Input module writes the one-hot of the first addend; here the
  addend arrives as a token inside a sequence, so which token is the addend has to be read from
  the encoder: the read-out is learned (the only learned module of the default model).
* Increment (``increment="fixed"``, the paper's hand-designed module): the cyclic shift
  Increment(w)_v = w_{v-1 mod V}, exact on one-hot digits (e_v -> e_{v+1}; past the top slot
  it wraps, which addition never needs when the vocabulary exceeds the largest sum).
  ``increment="learned"``: a learned row-stochastic map Increment(w) = w softmax(M) (rows of M),
  M initialised N(0, 0.02) (no increment built in), trained on the task objective as in the
  paper's second version (which also learns MNIST representations; not done here).
* Output: the identity on the workspace (it broadcasts it); the prediction is read from the
  workspace after the last step. A controller that has finished selects Output and so holds the
  answer until step K, the "prediction when the Output module is selected" of the paper read at
  a fixed step, which keeps every position's compute the same.

Every module maps distributions to distributions and the gate is convex, so w_k stays a
distribution and log w_K is a normalised log-probability: the cross-entropy is -log w_K[target].

Gate: ``gate="softmax"`` (default), a soft convex mix trained by backpropagation through all K
steps, deterministic, so training and evaluation compute the same thing (Gumbel noise would make
the forward pass random). ``gate="straight_through"``: the forward pass routes through the single
argmax module (a hard, discrete chain of operations), the backward pass uses the softmax's
gradient (Bengio et al. 2013's straight-through estimator).

Time contract: the model is a causal LM. The encoder carries the only state across tokens (a
Backbone state); the controller's LSTM state and the workspace are internal to one position's K
steps and start afresh at every position, so a position's prediction is a function of its prefix
alone, and carrying the state at any split or stepping token by token equals one call.
``state_size`` is therefore the encoder's. ``aux`` holds the mean gate of each module (diagnostics).

Deviations (and why): the paper feeds the addends to the modules and the controller directly;
here both read them from the causal encoder's state so the model works on any task and on
``recur run`` (the encoder is the one addition, documented above). The exact controller inputs
and sizes are not stated in the abstract; the controller reads the workspace and the encoder's
state u_t, has ``controller_size`` (default d_model) units, and a linear gate head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.layers.norms import build_norm
from recur.models.base import Architecture, Generator, ModelOutput, check_sizes, check_tokens
from recur.models.blocks import Backbone
from recur.registry import ARCHITECTURES
from recur.state import State

MODULE_NAMES = ("input", "increment", "output")
GATES = ("softmax", "straight_through")
INCREMENTS = ("fixed", "learned")


def increment_matrix(n: int, dtype=None, device=None) -> torch.Tensor:
    """The hand-designed Increment as a matrix S [n, n] with (w S)_v = w_{v-1 mod n}: e_v S = e_{v+1}."""
    return torch.roll(torch.eye(n, dtype=dtype, device=device), shifts=1, dims=1)


class _StraightThrough(torch.autograd.Function):
    """Forward: the one-hot of the argmax, exactly (``hard + soft - soft.detach()`` leaves rounding
    residue, so a hard-routed workspace would drift off one-hot); backward: the identity, so the
    gradient is the softmax's."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def gate_weights(scores: torch.Tensor, gate: str) -> torch.Tensor:
    """The gate over the modules from the controller's scores [..., modules]: a softmax, or its
    straight-through hard form (one-hot argmax forward, the softmax's gradient backward)."""
    soft = scores.softmax(-1)
    return soft if gate == "softmax" else _StraightThrough.apply(soft)


@ARCHITECTURES.register("global_workspace", family="depth-recurrent",
                        paper="Chateau-Laurent & VanRullen, Learning to Chain Operations by Routing Information "
                              "Through a Global Workspace (2025)")
class GlobalWorkspace(Generator, Architecture):
    """Global Workspace: per position, an LSTM controller gates Input / Increment / Output modules on a value workspace.

    A causal encoder reads the prefix; the controller runs ``max_steps`` gated steps on the
    workspace; the logits are the log of the final workspace."""

    autoregressive = True

    def __init__(self, vocab_size: int, d_model: int, n_layers: int = 1, pattern="lstm",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 shared_blocks: int | None = None, max_steps: int = 12, controller_size: int | None = None,
                 gate: str = "softmax", increment: str = "fixed"):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"global_workspace: vocab_size must be an int >= 2, got {vocab_size!r}")
        check_sizes(d_model, mlp_ratio)
        self.max_steps = positive_int("max_steps", max_steps, owner="global_workspace")
        self.controller_size = positive_int("controller_size", controller_size, owner="global_workspace",
                                            optional=True) or d_model
        if gate not in GATES:
            raise ValueError(f"global_workspace: gate must be one of {', '.join(GATES)}, got {gate!r}")
        if increment not in INCREMENTS:
            raise ValueError(f"global_workspace: increment must be one of {', '.join(INCREMENTS)} (fixed: the "
                             f"hand-designed +1 shift; learned: a trained row-stochastic map), got {increment!r}")
        self.gate, self.increment = gate, increment
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.backbone = Backbone(d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                                 channel_options=channel_options, shared_blocks=shared_blocks)
        self.norm = build_norm(norm, d_model)
        self.input_read = nn.Linear(d_model, vocab_size)            # the Input module
        self.controller = nn.LSTMCell(vocab_size + d_model, self.controller_size)
        self.gate_head = nn.Linear(self.controller_size, len(MODULE_NAMES))
        if increment == "fixed":
            self.register_buffer("shift", increment_matrix(vocab_size), persistent=False)
        else:
            self.increment_logits = nn.Parameter(0.02 * torch.randn(vocab_size, vocab_size))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def mixers(self):
        return self.backbone.mixers

    def set_mode(self, mode: str) -> None:
        self.backbone.set_mode(mode)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return self.backbone.init_state(batch_size, device=device, dtype=dtype or self.dtype)

    def state_size(self, seq_len: int) -> int:
        return self.backbone.state_size(seq_len)  # the controller and workspace live within one position

    # -- the modules --------------------------------------------------------------
    def input_module(self, u: torch.Tensor) -> torch.Tensor:
        """Input: the addend read from the encoder's state ``u`` [..., d_model] as a value distribution."""
        return self.input_read(u).softmax(-1)

    def increment_module(self, w: torch.Tensor) -> torch.Tensor:
        """Increment: w [..., V] -> w with every value's mass moved to value + 1 (fixed) or the learned map."""
        if self.increment == "fixed":
            return w @ self.shift.to(w.dtype)
        return w @ self.increment_logits.softmax(-1)

    def route(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The controller's ``max_steps`` steps from the empty workspace, for contexts ``u`` [N, d_model]:
        the final workspace [N, V] and the gates [max_steps, N, modules]."""
        n, V = u.shape[0], self.vocab_size
        w = u.new_full((n, V), 1.0 / V)
        hc = cc = u.new_zeros(n, self.controller_size)
        x_in = self.input_module(u)  # the Input module reads only the encoder: the same at every step
        gates = []
        for _ in range(self.max_steps):
            hc, cc = self.controller(torch.cat([w, u], dim=-1), (hc, cc))
            g = gate_weights(self.gate_head(hc), self.gate)
            w = g[:, :1] * x_in + g[:, 1:2] * self.increment_module(w) + g[:, 2:] * w
            gates.append(g)
        return w, torch.stack(gates)

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        h, state = self.backbone(self.embed(tokens), state, resets=resets)
        B, T, d = h.shape
        w, gates = self.route(self.norm(h).reshape(B * T, d))
        # log of the final workspace, a normalised distribution; the floor keeps an underflowed
        # slot finite (its gradient is then zero, as it would be negligibly small anyway)
        logits = w.clamp_min(torch.finfo(w.dtype).tiny).log().reshape(B, T, self.vocab_size)
        count = max(B * T, 1)
        aux = {f"gate_{name}": (gates[..., i].sum() / (count * self.max_steps)).detach()
               for i, name in enumerate(MODULE_NAMES)}
        return ModelOutput(logits, state, aux)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> GlobalWorkspace:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", max_steps=3)
