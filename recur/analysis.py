"""What a mixer attends to: the implicit (surrogate) attention matrix of linear recurrences.

A linear recurrence with data-dependent gates is, for a given input, a linear map from its
values to its outputs: o_t = sum_{j<=t} A[t, j] v_j. For the matrix-state family
(S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t) A[t, j] = q_t^T Diag(prod_{j<s<=t}
alpha_s) k_j, GateLoop's "surrogate attention" (Katsch 2023); for the diagonal family
(h_t = a_t h_{t-1} + b_t) A[t, j] = prod_{j<s<=t} a_s per channel, the Dynamical Systems
Framework view of SSMs and RNNs (Sieber et al. 2024, "Understanding the differences in
Foundation Models: Attention, State Space Models, and Recurrent Neural Networks"); for the
delta rule A carries the products of (I - beta k k^T); for softmax attention it is the
attention matrix itself.

``implicit_attention(mixer, x)`` runs the mixer on ``x`` (from the zero state, in chunk
mode if it has one, else its current mode), records the one linear primitive it calls (``recur.ops.trace``), and evaluates
that primitive's map exactly by re-running its reference form with unit impulses over time as
the values (so the result is exact, not a fit).
"""

from __future__ import annotations

import torch
from einops import rearrange

from recur.layers.base import Mixer
from recur.ops import trace


def implicit_attention(mixer: Mixer, x: torch.Tensor) -> torch.Tensor:
    """The T x T matrix mapping a linear mixer's values to its recurrence's outputs on input ``x``.

    x: [batch, T, d_model]. Returns [batch, *heads, T, T], lower triangular, where ``heads``
    are the primitive's independent channels: (heads,) for matrix-state, delta-rule and
    attention mixers, the state's channel dimensions for the diagonal family (e.g.
    (d_inner, d_state) for Mamba). Row t says how much each step's value enters output t.
    Mixers without a linear recurrence (LSTM, GRU, ...) raise a TypeError.
    """
    if not isinstance(mixer, Mixer):
        raise TypeError(f"implicit_attention needs a recur mixer, got {type(mixer).__name__}")
    if not mixer.linear_recurrence:
        raise TypeError(f"{mixer.name}: implicit attention is defined for mixers with one linear recurrence; "
                        "it has no linear recurrence (its linear part feeds a nonlinear one)")
    saved = mixer.mode
    try:
        # chunk mode runs the primitives that record themselves (minGRU's parallel mode is a
        # log-space scan, linear in exp(log b) rather than in its argument)
        if "chunk" in mixer.modes:
            mixer.mode = "chunk"
        with torch.no_grad(), trace.recording() as calls:
            mixer(x)
    finally:
        mixer.mode = saved
    if len(calls) != 1:
        why = ("it has no linear recurrence (a nonlinear cell)" if not calls else
               f"it runs {len(calls)} linear recurrences ({', '.join(c.fn.__name__ for c in calls)}), not one")
        raise TypeError(f"{mixer.name}: implicit attention is defined for mixers with one linear recurrence; {why}")
    return attention_of_call(calls[0])


def attention_of_call(call: trace.Call) -> torch.Tensor:
    """The exact linear map of one recorded primitive call, as [batch, *channels, T, T]."""
    kwargs = dict(call.kwargs)
    value = kwargs[call.linear_in]
    if call.state_arg is not None:
        kwargs[call.state_arg] = None
    if "mode" in kwargs:
        kwargs["mode"] = "reference"
    with trace.paused():
        if call.layout == "channels":
            # value [batch, T, *channels]: batch row (b, j) gets the unit impulse at step j, so its
            # output at step t is A[b, ..., t, j]; the other batched arguments are repeated.
            B, T = value.shape[:2]
            for name in call.batched:
                if kwargs.get(name) is not None and name != call.linear_in and kwargs[name].shape[0] == B:
                    kwargs[name] = kwargs[name].repeat_interleave(T, dim=0)
            eye = torch.eye(T, dtype=value.dtype, device=value.device)  # [j, t]
            shape = (1, T, T) + (1,) * (value.ndim - 2)
            kwargs[call.linear_in] = eye.reshape(shape).expand(B, T, T, *value.shape[2:]).reshape(B * T, T, *value.shape[2:])
            out = call.fn(**kwargs)
            out = out[0] if isinstance(out, tuple) else out  # [(batch j), T (t), *channels]
            return rearrange(out, "(b j) t ... -> b ... t j", b=B)
        # value [batch, heads, T, d_v] -> the identity over time as d_v = T
        B, H, T = value.shape[:3]
        kwargs[call.linear_in] = torch.eye(T, dtype=value.dtype, device=value.device).expand(B, H, T, T).contiguous()
        out = call.fn(**kwargs)
        return out[0] if isinstance(out, tuple) else out  # [batch, heads, T (output t), T (input j)]
