"""Pieces shared by several mixers: the short causal convolution, token shift, rotary positions,
head counts and head reshapes, argument checks and gate initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (kernel ``k``), carrying its last k-1 inputs.

    y_t = act(b + sum_{i<k} w_i * x_{t-i}); the state is the tail x_{t-k+2..t}: [batch, k-1, channels].
    Used by Mamba (H3-style short conv), DeltaNet and Gated DeltaNet.
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = True, activation: str | None = "silu"):
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"kernel_size must be >= 2, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        # Same parameterisation and default init as nn.Conv1d(channels, channels, k, groups=channels).
        conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)
        self.weight = conv.weight  # [channels, 1, k]
        self.bias = conv.bias
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be None or 'silu', got {activation!r}")
        self.activation = activation

    def init_tail(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, tail: torch.Tensor,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [batch, time, channels]; tail: [batch, k-1, channels]; resets (packed documents,
        # bool [batch, time]): the taps that reach before a document's start read zeros, as the
        # zero tail of a document alone.
        # k shifted multiply-adds in the [batch, time, channels] layout: the output is
        # contiguous, and at [1, 4096, 1024] this ran 5x faster than F.conv1d on the transposed
        # input followed by the copy that the next contiguous consumer makes.
        T, k = x.shape[1], self.kernel_size
        n = k - 1
        xx = torch.cat([tail.to(x.dtype), x], dim=1)
        w = self.weight[:, 0, :].t().to(x.dtype)  # [k, channels]; w[k-1] multiplies x_t, w[0] x_{t-k+1}
        y = xx[:, n:] * w[n] if self.bias is None else torch.addcmul(self.bias.to(x.dtype), xx[:, n:], w[n])
        # documents started in this call up to t (0 before it): tap i reads x_{t-(n-i)}, in t's document
        # iff the count there is t's
        doc = None if resets is None else F.pad(resets.cumsum(dim=1), (n, 0))
        for i in range(n):
            tap = xx[:, i:i + T] if doc is None else xx[:, i:i + T] * (doc[:, i:i + T] == doc[:, n:]).unsqueeze(-1)
            y = y.addcmul_(tap, w[i])
        if self.activation == "silu":
            y = F.silu(y)
        new_tail = xx[:, -n:]
        if resets is not None:
            # the tail (positions T - n .. T - 1, negative ones from the old tail) keeps only the row's
            # last document: the entries before its start are the zeros it began with
            t = torch.arange(T, device=x.device)
            last_start = torch.where(resets, t, -n - 1).max(dim=1).values  # -n - 1: no reset in this row
            alive = torch.arange(T - n, T, device=x.device)[None, :] >= last_start[:, None]
            new_tail = new_tail * alive.unsqueeze(-1)
        return y, new_tail


def token_shift(x: torch.Tensor, last: torch.Tensor,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous token's input at every step (RWKV's token shift, a width-2 causal conv).

    x: [batch, time, channels]; last: [batch, channels], the input before x[:, 0] (zeros at the
    start); resets (optional, bool [batch, time]): where a packed document starts, the previous
    input is the start's zeros. Returns (x_prev [batch, time, channels], the new last = x[:, -1]).
    """
    x_prev = torch.cat([last.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)
    if resets is not None:
        x_prev = x_prev.masked_fill(resets.unsqueeze(-1), 0.0)
    return x_prev, x[:, -1]


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoFormer), half-split layout.

    x: [batch, heads, time, d] with d even; positions: [batch, time] absolute integer positions.
    Pairs (x_i, x_{i+d/2}) are rotated by angle pos * base^(-2i/d).
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary positions need an even head dimension, got {d}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=work) / d)  # [d/2]
    angles = positions.to(work)[:, None, :, None] * inv_freq  # [batch, 1, time, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def positions_from(offset: torch.Tensor, length: int) -> torch.Tensor:
    """Absolute positions [batch, length] continuing from a per-row counter ``offset`` [batch]."""
    return offset[:, None] + torch.arange(length, device=offset.device, dtype=offset.dtype)


def head_split(d_model: int, n_heads: int | None = None, head_dim: int | None = None, *,
               even: bool = False, max_head_dim: int = 64, preferred_head_dim: int | None = None) -> tuple[int, int]:
    """(n_heads, head_dim) with n_heads * head_dim == d_model, from either, both or neither.

    With neither, head_dim is ``preferred_head_dim`` where that divides d_model (RWKV's official
    64, GateLoop's max-headed 1), else the largest divisor of d_model that is at most
    min(max_head_dim, d_model / 2) (even if ``even``, as rotary needs): at least two heads of
    at most 64 channels (16 -> 2 x 8, 96 -> 2 x 48, 1024 -> 16 x 64).
    """
    positive_ints(None, optional=True, n_heads=n_heads, head_dim=head_dim)
    if n_heads is None and head_dim is None and preferred_head_dim is not None and d_model % preferred_head_dim == 0:
        head_dim = preferred_head_dim
    if n_heads is None and head_dim is None:
        cap = max(1, min(max_head_dim, d_model // 2))
        fits = [h for h in range(1, cap + 1) if d_model % h == 0 and (not even or h % 2 == 0)]
        if not fits:
            raise ValueError(f"d_model={d_model} has no even head dimension; pass n_heads/head_dim")
        head_dim = max(fits)
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        head_dim = d_model // n_heads
    if n_heads is None:
        if d_model % head_dim:
            raise ValueError(f"head_dim={head_dim} must divide d_model={d_model}")
        n_heads = d_model // head_dim
    if n_heads * head_dim != d_model:
        raise ValueError(f"n_heads={n_heads} x head_dim={head_dim} must equal d_model={d_model}")
    if even and head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got head_dim={head_dim} (d_model={d_model}, n_heads={n_heads})")
    return n_heads, head_dim


HEAD_LAYOUTS = ("b h t d", "b t h d")


def split_heads(t: torch.Tensor, n_heads: int, layout: str = "b h t d") -> torch.Tensor:
    """[batch, time, heads * d] -> [batch, heads, time, d] (``layout`` "b h t d"), or
    [batch, time, heads, d] (``layout`` "b t h d": heads beside the channels)."""
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"layout must be one of {HEAD_LAYOUTS}, got {layout!r}")
    return rearrange(t, f"b t (h d) -> {layout}", h=n_heads)


def merge_heads(t: torch.Tensor, layout: str = "b h t d") -> torch.Tensor:
    """The inverse of ``split_heads``: [batch, heads, time, d] (or ``layout`` "b t h d":
    [batch, time, heads, d]) -> [batch, time, heads * d]."""
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"layout must be one of {HEAD_LAYOUTS}, got {layout!r}")
    return rearrange(t, f"{layout} -> b t (h d)")


def positive_int(name: str, value, *, owner: str | None = None, optional: bool = False):
    """``value`` if it is an int >= 1 (not a bool), or None where ``optional``; else a
    ValueError naming ``name`` (after ``owner:``, the layer, where given)."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        where = f"{owner}: " if owner else ""
        raise ValueError(f"{where}{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    return value


def positive_ints(owner: str | None, *, optional: bool = False, **values) -> None:
    """``positive_int`` on every keyword argument, in order (the first bad one raises)."""
    for name, value in values.items():
        positive_int(name, value, owner=owner, optional=optional)


def window_property() -> property:
    """The attention ``window`` of a sliding-window mixer: settable after construction, checked
    on every set (an int >= 1), stored as ``_window``."""

    def get(self) -> int:
        return self._window

    def set(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"window must be an int >= 1 (a query sees itself and window - 1 earlier tokens), got {value!r}")
        self._window = value

    return property(get, set, doc="Tokens a query sees, itself included.")


def logit(p: float) -> float:
    """The inverse sigmoid, for initialising a gate's bias at sigmoid(bias) = p."""
    return math.log(p / (1 - p))


def layer_depth(name: str, layer_idx: int | None, n_layers: int | None) -> tuple[int, int]:
    """(layer_idx, n_layers) with a standalone layer's defaults (0 of 1), checked."""
    layer_idx = 0 if layer_idx is None else layer_idx
    n_layers = 1 if n_layers is None else n_layers
    if not 0 <= layer_idx < n_layers:
        raise ValueError(f"{name}: layer_idx={layer_idx} must be in [0, n_layers={n_layers})")
    return layer_idx, n_layers


def rwkv_ramps(d_model: int, layer_idx: int, n_layers: int) -> tuple[float, float, torch.Tensor]:
    """The depth ratios and channel ramp of the RWKV initialisations (RWKV-4 to -7):
    r0 = layer_idx / (n_layers - 1) (0 to 1 over depth; 0 for one layer),
    r1 = 1 - layer_idx / n_layers (1 to almost 0), ramp_i = i / d_model (float64)."""
    r0 = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
    r1 = 1.0 - layer_idx / n_layers
    return r0, r1, torch.arange(d_model, dtype=torch.float64) / d_model
