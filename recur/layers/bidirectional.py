"""A bidirectional encoder layer around any causal mixer (Schuster & Paliwal, "Bidirectional
Recurrent Neural Networks", 1997).

    y^f = F(x)                         the forward mixer reads x in order
    y^b = flip(B(flip(x)))             the backward mixer reads x reversed in time
    y_t = W [y^f_t ; y^b_t] + b        a Linear(2 * d_model -> d_model) merges the two

F and B are two independent mixers of the same kind and config (their own parameters), each at
full width d_model. y_t depends on the whole sequence, so the layer is not causal: it is an
encoder (``causal = False``), and ``CausalLM`` refuses it.

The state is ``State(forward=..., backward=...)``, one entry per direction, each the inner
mixer's own state: the forward mixer's after reading x, the backward mixer's after reading x
reversed (i.e. after reading back to the first token). Given a state, each direction starts from
its entry, as ``torch.nn.LSTM``'s h_0 does for its two directions. Carrying it across calls
continues the forward direction exactly; the backward direction, which must read a segment
from its end, restarts each segment from its entry (so segments are encoded one at a time,
not as one sequence).
"""

from __future__ import annotations

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.registry import build, model_info, register
from recur.state import State

DEFAULT_MIXER = "gla"


class _FromDefaultMixer:
    """A class attribute read from the default inner mixer's class (the catalog lists classes, and
    the wrapper's modes and state formula are its inner's); every instance sets its own."""

    def __init__(self, read):
        self.read = read

    def __get__(self, obj, owner):
        return self.read(model_info(owner.default_mixer).cls)


def _passthrough(attr: str) -> property:
    """An attribute of both inner mixers (``chunk_size``, ``window``), present only if they have it."""

    def get(self):
        inner = self._modules.get("forward_mixer")
        if inner is None or not hasattr(inner, attr):
            raise AttributeError(f"{self.name}: the inner mixer {self.mixer!r} has no {attr!r}")
        return getattr(inner, attr)

    def set(self, value):
        get(self)  # AttributeError if the inner mixer has no such attribute
        for inner in (self.forward_mixer, self.backward_mixer):
            setattr(inner, attr, value)

    return property(get, set, doc=f"The inner mixers' ``{attr}`` (both directions); absent if they have none.")


@register("bidirectional", family="wrapper", paper="Schuster & Paliwal, Bidirectional Recurrent Neural Networks (1997)")
class Bidirectional(Mixer):
    """Bidirectional wrapper of a causal mixer: y_t = W [F(x)_t ; flip(B(flip(x)))_t] + b.

    Two independent mixers of kind ``mixer`` (any causal registered mixer, default "gla"), the
    forward one reading x, the backward one reading x reversed in time, merged by a
    Linear(2 * d_model, d_model) on their concatenation. Schuster & Paliwal, "Bidirectional
    Recurrent Neural Networks" (1997): their forward and backward state sequences feed one output
    layer. Not causal (an encoder). Options other than ``mode`` and ``mixer`` go to both inner
    mixers; ``mode`` sets both. State: State(forward=<inner state>, backward=<inner state>).

    The default inner mixer is "gla" so that the wrapper exercises a multi-mode mixer (chunk,
    parallel and recurrent must agree in both directions, ``chunk_size`` passes through); a
    bidirectional GRU or LSTM in torch's layout is ``recur.build("gru", d, bidirectional=True)``.
    """

    causal = False
    default_mixer = DEFAULT_MIXER
    modes = _FromDefaultMixer(lambda cls: tuple(cls.modes))
    state_formula = _FromDefaultMixer(lambda cls: f"2 * ({cls.state_formula})")

    chunk_size = _passthrough("chunk_size")
    window = _passthrough("window")

    def __init__(self, d_model: int, mode: str | None = None, *, mixer: str = DEFAULT_MIXER, **config):
        if not isinstance(mixer, str):
            raise TypeError(f"bidirectional: mixer must be a registered model name, got {type(mixer).__name__}")
        if mixer == "bidirectional":
            raise ValueError("bidirectional: cannot wrap itself (the inner mixer must be causal)")
        self.modes = tuple(model_info(mixer).cls.modes)  # plain attribute; checked by Mixer.__init__
        super().__init__(d_model, mode)
        self.mixer = mixer
        self.forward_mixer = build(mixer, d_model=d_model, mode=mode, **config)
        if not self.forward_mixer.causal:
            raise ValueError(f"bidirectional: the inner mixer must be causal (each direction reads its input in "
                             f"order), but {mixer!r} with {config or 'its defaults'} has causal=False")
        self.backward_mixer = build(mixer, d_model=d_model, mode=mode, **config)
        self.out_proj = nn.Linear(2 * d_model, d_model)
        self.modes = tuple(self.forward_mixer.modes)
        self.mode = self.forward_mixer.mode
        self.growing = tuple(self.forward_mixer.growing)  # within each direction's state
        self.supports_bfloat16 = self.forward_mixer.supports_bfloat16
        self.state_formula = f"2 * ({self.forward_mixer.state_formula})"
        # The formula is the inner's, over the inner's int attributes: mirror them (read-only copies;
        # chunk_size and window are live properties above).
        for key, value in vars(self.forward_mixer).items():
            if (isinstance(value, int) and not isinstance(value, bool) and not key.startswith("_")
                    and key not in vars(self) and not hasattr(type(self), key)):
                setattr(self, key, value)

    # ------------------------------------------------------------------ modes
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        Mixer.mode.fset(self, value)
        for key in ("forward_mixer", "backward_mixer"):
            inner = self._modules.get(key)
            if inner is not None:
                inner.mode = value

    # ----------------------------------------------------------------- state
    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(forward=self.forward_mixer.init_state(batch_size, device=device, dtype=dtype),
                     backward=self.backward_mixer.init_state(batch_size, device=device, dtype=dtype))

    def state_size(self, seq_len: int) -> int:
        return self.forward_mixer.state_size(seq_len) + self.backward_mixer.state_size(seq_len)

    def check_state(self, state, x: torch.Tensor) -> None:
        """Entries ``forward`` and ``backward``, each checked by its inner mixer (so a growing
        inner state, such as an attention KV cache, is validated as the inner mixer does)."""
        if not isinstance(state, State):
            raise TypeError(f"{self.name}: state must be a recur.State (from init_state or a previous call), got {type(state).__name__}")
        if set(state) != {"forward", "backward"}:
            raise ValueError(f"{self.name}: state has entries {sorted(state)}, expected ['backward', 'forward']")
        for key, inner in (("forward", self.forward_mixer), ("backward", self.backward_mixer)):
            if not isinstance(state[key], State):
                raise TypeError(f"{self.name}: state entry {key!r} must be a State (the {self.mixer} mixer's state)")
            try:
                inner.check_state(state[key], x)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{self.name}, {key} direction: {e}") from None

    def directions(self) -> tuple[tuple[str, Mixer, bool], ...]:
        """(state entry, causal mixer, reads x reversed): how each entry of the state is produced.
        The conformance suite's hook for non-causal mixers (their state-carry check)."""
        return (("forward", self.forward_mixer, False), ("backward", self.backward_mixer, True))

    # --------------------------------------------------------------- compute
    def _forward(self, x, state):
        y_f, s_f = self.forward_mixer(x, state["forward"])
        y_b, s_b = self.backward_mixer(x.flip(1), state["backward"])
        y = self.out_proj(torch.cat([y_f, y_b.flip(1)], dim=-1))
        return y, State(forward=s_f, backward=s_b)

    def _forward_packed(self, x, state, resets):
        """Packed documents: the forward direction resets where a document starts; the backward
        one, reading x reversed, where a document ends (the token before the next start)."""
        ends = torch.cat([resets[:, 1:], torch.zeros_like(resets[:, :1])], dim=1)
        y_f, s_f = self.forward_mixer(x, state["forward"], resets=resets)
        y_b, s_b = self.backward_mixer(x.flip(1), state["backward"], resets=ends.flip(1))
        y = self.out_proj(torch.cat([y_f, y_b.flip(1)], dim=-1))
        return y, State(forward=s_f, backward=s_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mixer={self.mixer!r}"
