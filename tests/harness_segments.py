"""Helpers shared by the segment-memory model tests (rmt, armt, hmt, lcirc, rate)."""

from __future__ import annotations

import torch


def gradient_by_segment(model, x: torch.Tensor, segment_len: int) -> torch.Tensor:
    """|d loss / d E x| summed per segment (the segment loop embeds segment by segment), the loss on
    the last segment's logits: where truncated BPTT stops the gradient."""
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append(out)

    hook = model.embed.register_forward_hook(keep)
    logits = model(x).logits
    hook.remove()
    logits[:, -segment_len:].sum().backward()
    assert [e.shape[1] for e in seen] == [segment_len] * (x.shape[1] // segment_len)
    return torch.stack([e.grad.abs().sum() for e in seen])
