"""Deep supervision over segments on a detached carry, with Q-learning / BCE halting: the machinery
``hrm`` (Wang et al., "Hierarchical Reasoning Model", 2025; reference ``sapientinc/HRM``,
``models/hrm/hrm_act_v1.py``, ``models/losses.py``) and ``trm`` (Jolicoeur-Martineau, "Less is
More: Recursive Reasoning with Tiny Networks", 2025; reference ``SamsungSAILMontreal/
TinyRecursiveModels``, ``models/recursive_reasoning/trm.py``) share. A model defines one
*segment*, a map of the carry (z_H, z_L) [batch, time, d_model] given the input embedding x; this
module runs the segments and owns the loss:

    x = sqrt(d) E tokens                              (E ~ N(0, 1/d): x at unit scale, as the reference)
    (z_H, z_L)_0 = (H_init, L_init)                   buffers ~ TruncNormal(0, 1) in [-2, 2], per channel
    for k = 0 .. K-1:                                 K = n_supervision
        (z_H, z_L)_{k+1} = segment(x, detach((z_H, z_L)_k))
        logits_k = W_head norm(z_H_{k+1});   q_k = W_q z_H_{k+1}[:, p] + b_q   (W_q = 0, b_q = -5)
    out.logits = logits_{K-1}

Halting (``act=True``), per row, from the detached q values: segment k (steps = k + 1) halts if
steps >= K, or (training only) HRM q_halt > q_continue / TRM q_halt > 0 (``no_ACT_continue``),
vetoed with probability ``halt_exploration_prob`` if steps < m, m ~ U{2..K} (drawn per segment
and row, the reference's exploration). ``out.used`` [batch] is the number of segments a row ran;
at eval every row runs K, as the reference's evaluation always runs halt_max_steps.

Loss (``loss(out, batch)``), over the (row, segment) pairs used:

    L_k   = CE(logits_k) over the supervised positions of the rows still running at k
            + 0.5 (BCE(q_halt_k, c_k) + BCE(q_continue_k, sigma(Q_k)))     act=True; TRM: no q_continue term
    c_k   = 1 where every supervised position of the row is predicted right (argmax), else 0
    Q_k   = max(q_halt_{k+1}, q_continue_{k+1})   k < K-1    (the next segment's q, detached)
          = q_halt_K                               k = K-1    (one more no-grad segment, training only)
    loss  = sum_k n_k L_k / sum_k n_k              n_k: rows running at segment k

With ``act=False`` every row runs K segments and the loss is the mean over segments of the
cross-entropy (the reference's fixed-M deep supervision).

State: every application of a reasoning module in every segment is a causal pass over time with its
own mixer memory, so the state holds one Backbone state per (segment, application),
``State(seg0_L0=..., seg0_H0=..., ..., seg{K-1}_H{..}=...)`` (plus ``seg{K}_*``, the bootstrap
segment, for HRM with act in training mode). z_H and z_L are per position and start from the same
buffers at every position, so they are not carried: carrying the state across calls equals one
call on the concatenation, and stepping streams.

Deviations from the references (and why):

* One forward runs all K segments, and one Trainer step sums the segments' gradients into one
  update. The references step the optimizer after each segment (one segment per training step on a
  persistent carry, a halted row replaced by fresh data). The carry is detached either way, so row b
  is trained on the same segments 1..used[b] and each segment's loss reaches that segment only;
  what differs is that the weights do not change between a row's segments.
* Reasoning modules are the library's pre-norm Blocks around any registered (causal) mixer, plus a
  norm at the module's output: ``module(z, inj) = norm(Backbone(z + inj))``. The references use
  post-norm non-causal attention blocks; the output norm keeps z_H, z_L at unit scale over the
  cycles as their post-norm does (a bare pre-norm residual stream, fed back into itself every
  application, grows without bound). With causal mixers the model is a causal LM over
  ``source SEP target`` sequences, so it is autoregressive and generates like ``causal_lm``.
* The cross-entropy is the library's softmax cross-entropy (token mean), not the reference's
  stablemax per-sequence mean; there is no puzzle-embedding prefix: q reads position
  ``halt_position`` of the call, ``"first"`` as the reference (with causal mixers the first position
  sees only the first token; ``"last"`` sees the whole call).
* At eval every row runs K segments (as the reference); there is no early exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.common import positive_int
from recur.models.base import ModelOutput, check_positions, check_tokens
from recur.models.blocks import Backbone
from recur.models.causal_lm import CausalLM
from recur.models.loops import check_state_entries
from recur.state import State

HALT_POSITIONS = ("first", "last")


@dataclass
class DeepSupervisionOutput(ModelOutput):
    """A ModelOutput (``logits``: the last segment's) with what the deep-supervision loss reads."""

    segment_logits: list[torch.Tensor] | None = None  # every segment's logits, in order (as ``logits``)
    q_halt: list[torch.Tensor] | None = None  # [batch] per segment (act only)
    q_continue: list[torch.Tensor] | None = None  # [batch] per segment (HRM with act only)
    q_bootstrap: torch.Tensor | None = None  # [batch]: q_halt of one more no-grad segment (HRM, training)
    used: torch.Tensor | None = None  # int64 [batch]: segments each row ran (act only)


def truncated_normal_buffer(d: int) -> torch.Tensor:
    """[d] ~ N(0, 1) truncated to [-2, 2] (the reference's ``trunc_normal_init_(std=1)``)."""
    t = torch.empty(d)
    nn.init.trunc_normal_(t, std=1.0, a=-2.0, b=2.0)
    return t


class DeepSupervisedLM(CausalLM):
    """A causal LM whose hidden state is refined over ``n_supervision`` segments on a detached
    carry (z_H, z_L), each segment supervised; subclasses define ``applications`` and ``segment``."""

    depth_option = "n_supervision"  # eval.loops: accuracy against the number of supervision segments

    q_outputs = 1  # halting logits per row: 1 (q_halt) or 2 (q_halt, q_continue)

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern, mixer_config: Mapping[str, Any] | None,
                 mlp: str | None, mlp_ratio: float, tie_embeddings: bool, norm: str,
                 channel_options: Mapping[str, Any] | None, *, H_cycles: int, L_cycles: int, n_supervision: int,
                 one_step_grad: bool, act: bool, halt_exploration_prob: float, halt_position: str, owner: str):
        self._owner = owner
        positive_int("H_cycles", H_cycles, owner=owner)
        positive_int("L_cycles", L_cycles, owner=owner)
        for name, value in (("one_step_grad", one_step_grad), ("act", act)):
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")
        if (isinstance(halt_exploration_prob, bool) or not isinstance(halt_exploration_prob, (int, float))
                or not 0 <= halt_exploration_prob <= 1):
            raise ValueError(f"{owner}: halt_exploration_prob must be a number in [0, 1] (the reference uses 0.1), "
                             f"got {halt_exploration_prob!r}")
        if halt_position not in HALT_POSITIONS:
            raise ValueError(f"{owner}: halt_position must be one of {', '.join(HALT_POSITIONS)} (where the halting "
                             f"head reads z_H), got {halt_position!r}")
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options)
        # the reference's input embedding: init std 1/sqrt(d), scaled by sqrt(d) on use
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(d_model))
        self.embed_scale = math.sqrt(d_model)
        self.register_buffer("H_init", truncated_normal_buffer(d_model))
        self.register_buffer("L_init", truncated_normal_buffer(d_model))
        self.H_cycles, self.L_cycles, self.one_step_grad, self.act = H_cycles, L_cycles, one_step_grad, act
        self.halt_exploration_prob, self.halt_position = float(halt_exploration_prob), halt_position
        self.n_supervision = n_supervision
        if act:
            self.q_head = nn.Linear(d_model, self.q_outputs)
            with torch.no_grad():  # the reference: zero weights, bias -5 (q ~ 0.007: "continue" at first)
                self.q_head.weight.zero_()
                self.q_head.bias.fill_(-5.0)
        self.generator: torch.Generator | None = None  # draws the halting exploration when set
        self._pattern = pattern
        self._parts = dict(mixer_config=mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                           channel_options=channel_options)

    def reasoning_module(self, n_layers: int) -> Backbone:
        """A Backbone of this model's block parts (its output norm is ``module_norm``)."""
        return Backbone(self.embed.embedding_dim, n_layers, self._pattern, **self._parts)

    # -- to define -----------------------------------------------------------------
    def applications(self) -> list[tuple[str, Backbone]]:
        """The (name, backbone) of every module application of one segment, in order."""
        raise NotImplementedError

    def segment(self, x: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor,
                apply: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment: the new (z_H, z_L). ``apply(name, z, injection)`` runs application ``name``."""
        raise NotImplementedError

    def bootstrap(self) -> bool:
        """Whether one more no-grad segment runs for the last segment's Q target (training, HRM)."""
        return False

    def module_norm(self, name: str) -> nn.Module:
        raise NotImplementedError

    # -- options settable after training ------------------------------------------
    @property
    def n_supervision(self) -> int:
        return self._n_supervision

    @n_supervision.setter
    def n_supervision(self, value: int) -> None:
        self._n_supervision = positive_int("n_supervision", value, owner=self._owner)

    # -- state ---------------------------------------------------------------------
    def _segments_run(self) -> int:
        return self.n_supervision + int(self.act and self.training and self.bootstrap())

    def _keys(self) -> list[str]:
        return [f"seg{k}_{name}" for k in range(self._segments_run()) for name, _ in self.applications()]

    @property
    def mixers(self):
        return [m for _ in range(self._segments_run()) for _, b in self.applications() for m in b.mixers]

    def set_mode(self, mode: str) -> None:
        for b in {id(b): b for _, b in self.applications()}.values():
            b.set_mode(mode)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        apps = dict(self.applications())
        return State({k: apps[k.split("_", 1)[1]].init_state(batch_size, device=device, dtype=dtype)
                      for k in self._keys()})

    def state_size(self, seq_len: int) -> int:
        return self._segments_run() * sum(b.state_size(seq_len) for _, b in self.applications())

    # -- forward -------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> DeepSupervisionOutput:
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        check_state_entries(state, self._keys(), self._owner,
                            f"n_supervision={self.n_supervision} segments of {len(self.applications())} module "
                            f"applications{', plus the bootstrap segment in training' if self.bootstrap() else ''}")
        get = (lambda k: None) if state is None else state.get
        apps = dict(self.applications())
        new: dict[str, State] = {}
        grad = torch.is_grad_enabled()
        x = self.embed(tokens) * self.embed_scale
        shape = (*tokens.shape, x.shape[-1])
        z_H, z_L = self.H_init.to(x.dtype).expand(shape), self.L_init.to(x.dtype).expand(shape)
        logits, q_halt, q_continue, q_boot = [], [], [], None
        for k in range(self._segments_run()):
            boot = k == self.n_supervision

            def apply(name: str, z: torch.Tensor, injection: torch.Tensor, k=k) -> torch.Tensor:
                h, new[f"seg{k}_{name}"] = apps[name](z + injection, get(f"seg{k}_{name}"), resets=resets)
                return self.module_norm(name)(h)

            # the carry is detached: segment k's loss does not reach segment k-1's computation
            with torch.set_grad_enabled(grad and not boot):
                z_H, z_L = self.segment(x, z_H.detach(), z_L.detach(), apply)
                if self.act and tokens.shape[1]:
                    q = self.q_head(z_H[:, 0 if self.halt_position == "first" else -1])
                elif self.act:  # an empty call: no position to read
                    q = z_H.new_zeros(tokens.shape[0], self.q_outputs)
            if boot:
                q_boot = q[:, 0].detach()
                continue
            logits.append(self.output(z_H, None, positions).logits)
            if self.act:
                q_halt.append(q[:, 0])
                if self.q_outputs == 2:
                    q_continue.append(q[:, 1])
        out = DeepSupervisionOutput(logits[-1], State(new), positions=positions, segment_logits=logits)
        if self.act:
            out.q_halt, out.q_continue, out.q_bootstrap = q_halt, q_continue or None, q_boot
            out.used = (self.halting(q_halt, q_continue, explore=True) if self.training
                        else torch.full_like(q_halt[0], len(q_halt), dtype=torch.int64))
            out.aux["segments_used"] = out.used.to(x.dtype).mean().detach()
            # where the learned rule alone (no exploration) would stop: what more segments at eval can buy
            out.aux["halt_segment"] = self.halting(q_halt, q_continue, explore=False).to(x.dtype).mean().detach()
        return out

    def halting(self, q_halt: list[torch.Tensor], q_continue: list[torch.Tensor], explore: bool) -> torch.Tensor:
        """Segments each row runs under the halting rule (see the module docstring), int64 [batch]:
        the first segment where HRM's q_halt > q_continue (TRM's q_halt > 0), else all of them;
        ``explore``: with the reference's exploration."""
        K = len(q_halt)
        rows = q_halt[0].shape[0]
        used = torch.full((rows,), K, dtype=torch.int64, device=q_halt[0].device)
        done = torch.zeros(rows, dtype=torch.bool, device=used.device)
        for k in range(K - 1):  # the last segment halts every row still running
            halt = (q_halt[k] > q_continue[k]) if q_continue else (q_halt[k] > 0)
            if explore and self.halt_exploration_prob > 0:
                tried = torch.rand(rows, generator=self.generator) < self.halt_exploration_prob
                least = torch.randint(2, K + 1, (rows,), generator=self.generator)
                halt = halt & ~(tried & (k + 1 < least)).to(halt.device)
            now = halt.detach() & ~done
            used = torch.where(now, k + 1, used)
            done = done | now
        return used

    # -- loss ----------------------------------------------------------------------
    def loss(self, out: ModelOutput, batch) -> torch.Tensor:
        if not isinstance(out, DeepSupervisionOutput) or out.segment_logits is None:
            raise ValueError(f"{self._owner}.loss needs this model's output (a DeepSupervisionOutput with every "
                             f"segment's logits), got {type(out).__name__}")
        if getattr(batch, "values", None) is not None:
            raise ValueError(f"{self._owner} has a classification head; a task with real-valued targets needs a "
                             "regression head")
        mask = batch.mask
        if not mask.any():
            raise ValueError("a training batch has no supervised position (mask is all False)")
        K = len(out.segment_logits)
        rows = mask.shape[0]
        used = out.used if out.used is not None else torch.full((rows,), K, dtype=torch.int64, device=mask.device)
        total, weight = 0.0, 0
        for k, logits in enumerate(out.segment_logits):
            running = used > k
            picked = self.supervised_logits(ModelOutput(logits, None, positions=out.positions), batch)
            live = running[:, None].expand_as(mask)[mask]  # the supervised positions of running rows
            if not live.any():
                continue
            term = F.cross_entropy(picked[live] if picked.dtype in (torch.float32, torch.float64)
                                   else picked[live].float(), batch.targets[mask][live])
            if self.act:
                right = torch.ones(mask.shape, dtype=torch.bool, device=mask.device)
                right[mask] = picked.argmax(-1) == batch.targets[mask]
                correct = right.all(-1).to(out.q_halt[k].dtype)  # vacuously right: a row with nothing supervised
                halt = F.binary_cross_entropy_with_logits(out.q_halt[k][running], correct[running])
                cont = 0.0
                if out.q_continue is not None:
                    last = k + 1 == K
                    if not last or out.q_bootstrap is not None:  # eval has no bootstrap for the last target
                        target = (self.q_target(out.q_bootstrap, None, True) if last else
                                  self.q_target(out.q_halt[k + 1].detach(), out.q_continue[k + 1].detach(), False))
                        cont = F.binary_cross_entropy_with_logits(out.q_continue[k][running], target[running])
                term = term + 0.5 * (halt + cont)
            n = int(running.sum())
            total, weight = total + n * term, weight + n
        loss = total / weight
        for key, value in out.aux.items():
            if key.endswith("_loss"):
                loss = loss + value
        return loss

    @staticmethod
    def q_target(q_halt_next: torch.Tensor, q_continue_next: torch.Tensor | None, last: bool) -> torch.Tensor:
        """The reference's Q-continue target: sigma(q_halt') at the last segment, else
        sigma(max(q_halt', q_continue'))."""
        return torch.sigmoid(q_halt_next if last else torch.maximum(q_halt_next, q_continue_next))


__all__ = ["DeepSupervisedLM", "DeepSupervisionOutput", "HALT_POSITIONS", "truncated_normal_buffer"]
