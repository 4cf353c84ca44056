"""The RNN transducer loss (Graves 2012, "Sequence Transduction with Recurrent Neural Networks",
section 2.3), in pure PyTorch: torchaudio's ``rnnt_loss`` does not load next to the CPU torch here
(its libraries link against CUDA), so the forward algorithm is written out and autograd gives the
backward pass (the paper's beta recursion and its gradient formula are what autograd computes).

For an utterance of T frames and a labelling y_1..y_U, the joint network gives at every lattice
node (t, u), t < T, u <= U, a distribution over the labels and the blank; in log space

    b(t, u) = log Pr(blank | t, u),      e(t, u) = log Pr(y_{u+1} | t, u)
    alpha(0, 0) = 0
    alpha(t, u) = logaddexp(alpha(t-1, u) + b(t-1, u),  alpha(t, u-1) + e(t, u-1))
    -log Pr(y | x) = -(alpha(T-1, U) + b(T-1, U))

A blank moves to the next frame (t+1), a label to the next output (u+1); a path ends with the blank
that leaves the last frame. Every node of one anti-diagonal n = t + u depends only on the previous
diagonal, so the recursion takes T + U - 1 steps, each vectorised over the batch and the diagonal:
the lattice is read "skewed" (diagonal n, output u -> frame n - u) by one gather per term.

Cells outside the lattice hold a large finite negative number, not -inf: logaddexp(-inf, -inf) has
a NaN gradient, which would reach the parameters through the zero-weighted cells.
"""

from __future__ import annotations

import torch

NEG = -1e30  # log of "impossible": finite so that no NaN enters the gradients (see the docstring)


def transducer_loss(logits: torch.Tensor, labels: torch.Tensor, frame_lengths: torch.Tensor,
                    label_lengths: torch.Tensor, blank: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of each row's labelling under the transducer lattice.

    ``logits``: float [B, T, U + 1, V], the joint network's unnormalised scores at every node (t, u);
    ``labels``: int64 [B, U], each row's labels (entries past its length are ignored, padding
    such as -1 allowed); ``frame_lengths``, ``label_lengths``: int64 [B], with 1 <= T_b <= T and
    0 <= U_b <= U. ``reduction``: ``"none"`` (per row), ``"sum"``, or ``"mean"`` (the per-row
    losses divided by the label lengths (at least 1), then averaged: as ``torch.nn.CTCLoss``).
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be one of none, sum, mean, got {reduction!r}")
    if logits.ndim != 4:
        raise ValueError(f"logits must be [batch, frames, labels + 1, classes], got shape {tuple(logits.shape)}")
    B, T, U1, V = logits.shape
    U = U1 - 1
    if labels.shape != (B, U):
        raise ValueError(f"labels must be [batch, {U}] for logits with {U1} label positions, got {tuple(labels.shape)}")
    if not 0 <= blank < V:
        raise ValueError(f"blank must be a class id in [0, {V}), got {blank}")
    frame_lengths = frame_lengths.to(device=logits.device, dtype=torch.int64)
    label_lengths = label_lengths.to(device=logits.device, dtype=torch.int64)
    if T == 0 or bool((frame_lengths < 1).any()) or bool((frame_lengths > T).any()):
        raise ValueError(f"frame_lengths must lie in [1, {T}], got {frame_lengths.tolist()}")
    if bool((label_lengths < 0).any()) or bool((label_lengths > U).any()):
        raise ValueError(f"label_lengths must lie in [0, {U}], got {label_lengths.tolist()}")
    within = torch.arange(U, device=labels.device)[None] < label_lengths[:, None].to(labels.device)
    if bool(((labels < 0) | (labels >= V) | (labels == blank))[within].any()):
        raise ValueError(f"labels must be class ids in [0, {V}) other than the blank ({blank})")

    logp = logits.log_softmax(-1)
    lpb = logp[..., blank]  # [B, T, U+1]
    safe = labels.clamp(0, V - 1).to(logits.device)  # padding read as class 0 and never used
    lpe = logp[:, :, :U].gather(-1, safe[:, None, :, None].expand(B, T, U, 1))[..., 0]  # [B, T, U]

    # skewed views: diagonal n, output u -> the node (n - u, u); off-lattice nodes are NEG
    N = T + U
    n = torch.arange(N, device=logits.device)[:, None]
    u = torch.arange(U1, device=logits.device)[None]
    t = n - u  # [N, U+1]
    on = (t >= 0) & (t < T)
    idx = t.clamp(0, T - 1)

    def skew(x: torch.Tensor, width: int) -> torch.Tensor:  # [B, T, width] -> [B, N, width]
        g = x.gather(1, idx[None, :, :width].expand(B, N, width))
        return g.masked_fill(~on[None, :, :width], NEG)

    b_sk = skew(lpb, U1)
    e_sk = skew(lpe, U) if U else lpb.new_zeros(B, N, 0)
    neg = lpb.new_full((B, 1), NEG)
    alpha = torch.cat([lpb.new_zeros(B, 1), lpb.new_full((B, U), NEG)], dim=1)  # diagonal 0
    diagonals = [alpha]
    for d in range(1, N):
        stay = alpha + b_sk[:, d - 1]  # a blank from (t-1, u)
        emit = torch.cat([neg, alpha[:, :U] + e_sk[:, d - 1]], dim=1)  # y_u from (t, u-1)
        alpha = torch.where(on[d][None], torch.logaddexp(stay, emit), NEG)
        diagonals.append(alpha)
    alphas = torch.stack(diagonals, dim=1)  # [B, N, U+1]
    rows = torch.arange(B, device=logits.device)
    last_t = frame_lengths - 1
    ll = alphas[rows, last_t + label_lengths, label_lengths] + lpb[rows, last_t, label_lengths]
    nll = -ll
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return (nll / label_lengths.clamp(min=1).to(nll.dtype)).mean()
