"""``twin``: Twin Networks (Serdyuk et al., "Twin Networks: Matching the Future for Sequence
Generation", ICLR 2018): a backward network reads each sequence from its end, and the forward
model's hidden states are trained to predict the backward network's, so they come to hold what
the future will say.

    h_t = the forward model's hidden state after x_1..x_t (the input of its final norm)
    b_t = the backward network's state after x_T..x_{t+1} (what follows t), a causal LM on the
          reversed sequence: b predicts x_t, trained by its own cross-entropy L_b
    L   = L_model + L_b + weight * mean_t || g(h_t) - stop_gradient(b_t) ||^2     g affine

The twin term reaches the forward model only (the paper's choice: b is a target, trained by its
own likelihood alone); t runs over the positions whose future inside their document is not empty
(packed documents are reversed document by document through their resets). The backward network is
a Backbone of the model's own mixers (or ``pattern``) with its own embedding and head; it is used
in training only, so evaluation and generation are the forward model's alone.

The method owns parameters (the backward network and g): they join the optimiser as a third group
when the run starts, follow its learning-rate schedule, and are saved with checkpoints. The forward
model's head is computed at every position while the method trains (the twin term reads every
hidden state).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recur.layers.norms import build_norm
from recur.models.blocks import Backbone
from recur.registry import METHODS
from recur.training.method import Method, MethodParams


class BackwardLM(nn.Module):
    """A causal LM over the reversed sequence, plus the affine map g from forward to backward states."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.backbone = Backbone(d_model, n_layers, pattern)
        self.norm = build_norm("rmsnorm", d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.g = nn.Linear(d_model, d_model)


def reversed_resets(resets: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """Where a document starts in the reversed sequence: just after each forward document's end."""
    if resets is None:
        return None
    out = torch.zeros_like(resets)
    out[:, 0] = True
    ends = resets[:, 1:]  # a forward document starting at p ends at p - 1: reversed, one starts at T - p
    out[:, 1:] |= ends.flip(1)
    return out


def twin_losses(model, backward: BackwardLM, hidden: torch.Tensor, tokens: torch.Tensor,
                resets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the backward network's cross-entropy, the mean squared twin distance) on one batch; ``hidden``
    [B, T, d] the forward model's states."""
    B, T = tokens.shape
    if T < 2:
        zero = hidden.sum() * 0.0
        return zero, zero
    rev = tokens.flip(1)
    r, _ = backward.backbone(backward.embed(rev), resets=reversed_resets(resets, T))
    # r[:, s] has read x_{T-1} .. x_{T-1-s}; it predicts x_{T-2-s}, unless that starts another document's end
    logits = backward.head(backward.norm(r[:, :-1]))
    target = rev[:, 1:]
    keep_b = torch.ones(B, T - 1, dtype=torch.bool, device=tokens.device)
    keep_t = torch.ones(B, T - 1, dtype=torch.bool, device=tokens.device)
    if resets is not None:
        keep_b = ~resets.flip(1)[:, :-1]  # x_{T-1-s} starts a document: its predecessor is another's
        keep_t = ~resets[:, 1:]  # x_{t+1} starts a document: h_t's document has no future here
    ce = F.cross_entropy(logits[keep_b].float(), target[keep_b]) if keep_b.any() else logits.sum() * 0.0
    # h_t (after x_0..x_t) against the backward state after x_{T-1}..x_{t+1}: r[:, T-2-t]
    future = r[:, :-1].flip(1).detach()
    dist = (backward.g(hidden[:, :-1]) - future).pow(2).sum(-1)
    twin = dist[keep_t].mean() if keep_t.any() else dist.sum() * 0.0
    return ce, twin


@METHODS.register("twin", paper="Serdyuk et al., Twin Networks: Matching the Future for Sequence Generation (2018)")
class Twin(Method):
    """A backward network whose states the forward model's hidden states learn to predict."""

    label = "+twin"

    class Params(MethodParams):
        FROZEN: ClassVar[dict[str, Any]] = {"weight": 1.0, "pattern": None}
        weight: float = Field(1.0, ge=0, description="weight of the twin (state-matching) term")
        pattern: str | None = Field(None, description="the backward network's mixers (default: the model's own)")

    def setup(self, trainer) -> None:
        from recur.models.causal_lm import CausalLM
        from recur.training.trainer import ConfigError, make_optimizer

        model = trainer.model
        if not isinstance(model, CausalLM) or type(model).forward is not CausalLM.forward:
            raise ConfigError(f"twin reads a causal_lm's hidden states; architecture {trainer.cfg.model.arch!r} "
                              "is not a plain causal_lm")
        if getattr(model, "feature_dim", 0) or getattr(model, "target_dim", 0):
            raise ConfigError("twin needs a token LM (no real-valued inputs or regression head)")
        if trainer.dist is not None:
            raise ConfigError("twin's backward network is not data-parallel yet: run it in one process")
        if trainer.step != 0:
            raise ConfigError("twin must be set up before training starts")
        with torch.random.fork_rng(devices=[]):  # its own seeded initialisation; the global stream is left as it was
            torch.manual_seed(trainer.cfg.seed + 7919)
            self.backward = BackwardLM(model.vocab_size, model.embed.embedding_dim, model.backbone.n_layers,
                                       self.params.pattern or model.backbone.layer_names).to(trainer.device)
        self.backward.to(model.dtype)
        model.sparse_head = False  # the twin term reads every position's hidden state
        self._hidden: torch.Tensor | None = None
        self._hook = model.norm.register_forward_pre_hook(self._capture)
        # the backward network joins the optimiser (matrices with weight decay, as the model's) and its schedule
        opt, sched = make_optimizer(nn.ModuleList([model, self.backward]), trainer.cfg)
        trainer.opt, trainer.sched = opt, sched

    def _capture(self, module, args) -> None:
        self._hidden = args[0]

    def loss(self, trainer, loss, out, batch):
        hidden, self._hidden = self._hidden, None
        if hidden is None or hidden.ndim != 3:
            raise RuntimeError("twin: the forward model's hidden states were not captured on this step")
        ce, twin = twin_losses(trainer.model, self.backward, hidden, batch.inputs, batch.resets)
        return loss + ce + self.params.weight * twin

    def finish(self, trainer) -> None:
        self._hook.remove()

    def state_dict(self) -> dict[str, Any]:
        return {f"backward.{k}": v for k, v in self.backward.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backward.load_state_dict({k.removeprefix("backward."): v for k, v in state.items()})
