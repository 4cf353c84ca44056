"""The mixer contract (docs/design.md section 2), enforced in one place.

    y, state = mixer(x, state=None)     # x: [batch, time, d_model]
    y, state = mixer(x, state, resets=m) # packed documents: m bool [batch, time], True where one starts
    state = mixer.init_state(batch_size, device=..., dtype=...)
    n = mixer.state_size(seq_len)       # floats of memory per sequence after seq_len tokens
    mixer.modes                         # supported modes, the default (fastest) first
    mixer.mode                          # the mode in use; "recurrent" is the sequential reference
    mixer.causal

Subclasses implement ``_forward(x, state) -> (y, state)`` and ``init_state``; the base
class validates inputs and states so every mixer fails the same clear way, and gives every
mixer packed sequences (``recur.layers.packing``); a mixer with a cheaper exact packed form
sets ``native_packing`` and takes ``resets`` in ``_forward``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from recur.layers import packing
from recur.layers.common import head_split
from recur.state import State

MODES = ("recurrent", "chunk", "parallel", "conv")


class Mixer(nn.Module, ABC):
    """Base class of every sequence mixer."""

    name: str = "mixer"  # set by @register
    modes: tuple[str, ...] = ("recurrent",)
    causal: bool = True
    # State entries whose given dimension grows with the sequence (a KV cache): (key, dim).
    growing: tuple[tuple[str, int], ...] = ()
    supports_bfloat16: bool = True
    # The state size as a Python expression over the mixer's int attributes and T (tokens seen),
    # e.g. "n_heads * key_dim * value_dim"; the conformance suite checks it against state_size.
    state_formula: str = ""
    # False where a primitive that records itself (recur.ops.trace) is only a part of a
    # nonlinear layer (SCRN's context scan, Titans-MAC's attention): recur.analysis.implicit_attention
    # then refuses the mixer instead of returning the map of that part.
    linear_recurrence: bool = True
    # True where ``_forward(x, state, resets=None)`` takes packed documents itself (a decay of zero
    # at a reset, a block-diagonal mask); otherwise the base class's generic segmented form runs.
    native_packing: bool = False

    def __init__(self, d_model: int, mode: str | None = None):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or "recurrent" not in self.modes:
            raise TypeError(f"{type(self).__name__}.modes must list 'recurrent' and only {MODES}, got {self.modes}")
        self.d_model = d_model
        self.mode = mode if mode is not None else self.modes[0]

    # ------------------------------------------------------------------ modes
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in self.modes:
            raise ValueError(f"{self.name} supports modes {self.modes}, got mode={value!r}")
        self._mode = value

    @property
    def op_mode(self) -> str:
        """The primitive's mode for the mixer's mode: "recurrent" runs the primitive's reference loop."""
        return "reference" if self._mode == "recurrent" else self._mode

    # ---------------------------------------------------------- construction
    def _init_heads(self, n_heads: int | None, head_dim: int | None, *, width: int | None = None,
                    **options) -> tuple[int, int]:
        """Sets and returns ``self.n_heads, self.head_dim`` = ``common.head_split`` of ``width``
        (default d_model) with the given ``n_heads`` / ``head_dim`` and ``options`` (``even``,
        ``max_head_dim``, ``preferred_head_dim``)."""
        width = self.d_model if width is None else width
        self.n_heads, self.head_dim = head_split(width, n_heads, head_dim, **options)
        return self.n_heads, self.head_dim

    # --------------------------------------------------------------- contract
    def forward(self, x: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """``resets`` (optional) bool [batch, time]: True where a new document starts, so the state
        is reset to ``init_state`` before that token (packed sequences; see ``recur.layers.packing``)."""
        self.check_input(x)
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        else:
            self.check_state(state, x)
        if resets is None:
            return self._forward(x, state)
        resets = packing.check_resets(resets, x, self.name)
        if not bool(resets.any()):
            return self._forward(x, state)
        if self.native_packing:
            return self._forward(x, state, resets=resets)
        return self._forward_packed(x, state, resets)

    def _forward_packed(self, x: torch.Tensor, state: State, resets: torch.Tensor) -> tuple[torch.Tensor, State]:
        """The packed forward (at least one reset): by default the generic segmented form, exact
        for every mixer that obeys the state-carry contract. Override with a cheaper exact form."""
        initial = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        return packing.run_segments(self._forward, lambda s, rows: self.reset_rows(s, rows, initial), x, state, resets)

    def reset_rows(self, state: State, rows: torch.Tensor, initial: State) -> State:
        """``state`` with the rows where ``rows`` [batch] is True back at ``initial`` (``init_state``
        for this batch): the generic packed form's reset. A state with a growing cache overrides it."""
        return packing.reset_rows(state, initial, rows)

    @abstractmethod
    def _forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The mixer's computation on validated input and state: returns (y, new state)."""

    @abstractmethod
    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """The zero state for ``batch_size`` sequences, in the dtype the forward returns for ``dtype``."""

    def state_size(self, seq_len: int) -> int:
        """Floats of memory per sequence after ``seq_len`` tokens (constant for recurrent mixers)."""
        return self.init_state(1, device="meta", dtype=torch.float32).num_floats()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, mode={self.mode!r}"

    # ------------------------------------------------------------- validation
    def check_input(self, x) -> None:
        expected = f"[batch, time, d_model={self.d_model}]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: x must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: x must be a floating-point tensor of shape {expected}, got dtype {x.dtype}")
        if x.dtype in (torch.bfloat16, torch.float16) and not self.supports_bfloat16:
            raise TypeError(f"{self.name} does not support 16-bit floats ({x.dtype}); use float32 or float64")
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"{self.name}: x must have shape {expected}, got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{self.name}: x must have batch >= 1 and time >= 1, got shape {tuple(x.shape)}")
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        if weight is not None and weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            supported = "float32, float64" + (", bfloat16, float16" if self.supports_bfloat16 else "")
            raise TypeError(f"{self.name}: x has dtype {x.dtype} but the mixer's parameters are {weight.dtype}: convert "
                            f"one to the other (mixer.to({x.dtype}) or x.to({weight.dtype})); dtypes supported: "
                            f"{supported}")

    def check_state(self, state, x: torch.Tensor) -> None:
        """The state must have the keys, shapes, dtypes and device ``init_state`` gives for this batch."""
        if not isinstance(state, State):
            raise TypeError(f"{self.name}: state must be a recur.State (from init_state or a previous call), got {type(state).__name__}")
        template = self.init_state(x.shape[0], device="meta", dtype=x.dtype)
        _check_against(self.name, state, template, dict(self.growing), x.device)


def _check_against(name: str, state: State, template: State, growing: dict[str, int], device) -> None:
    if set(state) != set(template):
        raise ValueError(f"{name}: state has entries {sorted(state)}, expected {sorted(template)}")
    for key, want in template.items():
        got = state[key]
        if isinstance(want, State):
            if not isinstance(got, State):
                raise TypeError(f"{name}: state entry {key!r} must be a State")
            _check_against(name, got, want, {}, device)
            continue
        if not isinstance(got, torch.Tensor):
            raise TypeError(f"{name}: state entry {key!r} must be a tensor")
        shape_ok = got.ndim == want.ndim and all(
            g == w or growing.get(key) == i for i, (g, w) in enumerate(zip(got.shape, want.shape))
        )
        if not shape_ok:
            shown = list(want.shape)
            if key in growing:
                shown[growing[key]] = "time"
            raise ValueError(f"{name}: state entry {key!r} must have shape {tuple(shown)}, got {tuple(got.shape)}")
        if got.dtype != want.dtype:
            raise TypeError(f"{name}: state entry {key!r} must have dtype {want.dtype} (matching x), got {got.dtype}")
        if got.device.type != torch.device(device).type:
            raise ValueError(f"{name}: state entry {key!r} is on {got.device}, x is on {device}")
