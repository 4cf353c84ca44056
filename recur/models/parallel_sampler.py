"""A diffusion-forcing (wavefront) sampler for ``recurrent_depth`` models (Geiping, Yang & Su,
"Efficient Parallel Samplers for Recurrent-Depth Models and Their Connection to Diffusion Language
Models", 2025).

    tokens, stats = parallel_generate(model, prompt, max_new_tokens=64)          # r = model.n_loops
    tokens, stats = parallel_generate(model, prompt, 64, iterations=2)           # commit after 2 iterations
    tokens, stats = parallel_generate(model, prompt, 64, exit_threshold=0.03)    # or when the latent settles

The plain sampler (``model.generate``) runs all r core iterations of a token before it reads the
next one: r sequential core calls per token. This sampler keeps a *wavefront* of positions in
flight. Every pass (one "forward pass" of the sampler) does:

    1. one more core iteration at every position in flight, s_{d+1}[t] = Core(W [s_d[t]; e[t]]):
       position t, entered at pass t0, has had (pass - t0) iterations; the iterations of a pass
       are independent, so they run as one batched core call where the mixer states allow;
    2. commit the oldest position once it has had r = ``iterations`` iterations (or, with
       ``exit_threshold``, once its latent settles, below): the coda reads its final latent and
       the head gives the next token, which is emitted;
    3. decode a draft for every position in flight: the coda over the current (partly refined)
       latents gives each position's guess of the token after it;
    4. append one new position whose input is the newest draft (s_0 as the model draws it).

After a warm-up of r - 1 passes, a token is emitted every pass while r positions refine in
parallel: the paper's speed-up is the r-fold shorter chain of sequential calls per token.

**Exactness (deviation from the paper).** In Huginn every core iteration reads and writes one
shared KV cache ("fungible" KV states), so the paper keeps refining a position's latent when the
draft it was conditioned on changes, and recomputes the prelude on the new drafts with momentum
(e = eta e_prev + (1 - eta) Prelude(y)) and optional noise: an approximation of the plain sampler.
Here every iteration has its own exact mixer memory (``iter{i}``: what positions < t wrote at
iteration i), so a stale draft would leave wrong entries in it. Instead, when a position's draft
changes (or the committed token differs from the draft a position was started from), that
position restarts from s_0 with the new input and every later position is dropped (their context
changed). Each iteration's memory is snapshotted per position in flight, so a restart costs no
recomputation of committed work. Hence, with r full iterations per committed token, the tokens
are exactly those of ``model.generate`` at ``n_loops = r`` (greedy; or sampling with the same
generator), and a model whose drafts settle early (after one iteration) emits one token per pass.
No momentum and no noise injection: both would break that equality.

**Early exit.** ``exit_threshold=eps`` commits the oldest position once its relative latent change
||s_d - s_{d-1}|| / ||s_d|| < eps (d >= 2, the largest over the batch's rows): the paper freezes
positions by this normalised latent distance, not by a KL between successive distributions (the
Huginn reference's own relative-latent-change exit uses 0.03), and only a contiguous prefix of the
wavefront, as here (the oldest positions, in order). As in the
model's own KL exit, a frozen latent still passes through the remaining iterations (their memory
must hold the position for later tokens), it just stops changing.

``stats``: ``passes`` (sampler forward passes after the prompt), ``tokens`` (new tokens),
``seconds`` and ``tokens_per_second`` (after the prompt's prefill), ``restarts``, ``core_calls``,
``mean_iterations`` (iterations each committed position had before its token was decided) and
``emitted`` (tokens per pass). Prompts are read in one call by the model itself; left-padded
batches (``attention_mask``) are not supported. Batched rows share the wavefront: a restart in
one row restarts all rows (exact, since restarting recomputes the same values for the others).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from recur.models.base import _sample, check_sampling, check_tokens
from recur.models.recurrent_depth import RecurrentDepth
from recur.state import State


@dataclass
class _Position:
    """A position in flight: its input token, prelude output, latent, and per-iteration memories."""

    token: torch.Tensor                 # int64 [batch]: its input (a draft unless it is the oldest)
    e: torch.Tensor                     # [batch, 1, d]: the prelude's output for it
    s: torch.Tensor                     # [batch, 1, d]: the latent after ``depth`` iterations
    prelude: State                      # the prelude's memory through this position
    after: list[State] = field(default_factory=list)  # after[i]: iteration i's memory through it
    change: float = math.inf            # relative latent change of its last iteration

    @property
    def depth(self) -> int:
        return len(self.after)


@contextmanager
def _plain_depth(model: RecurrentDepth, r: int):
    """Run ``model`` at n_loops = r without its KL exit, and put both back afterwards."""
    loops, threshold = model.n_loops, model.exit_threshold
    model.n_loops, model.exit_threshold = r, None
    try:
        yield
    finally:
        model.n_loops, model.exit_threshold = loops, threshold


def _core_rows(model: RecurrentDepth, xs: list[torch.Tensor], bases: list[State], stats: dict):
    """One core step for each (input [batch, 1, d], memory) pair: a single call over the stacked rows
    when the memories have one shape (recurrent mixers), else one call each (e.g. attention caches
    of different lengths). Counts the calls in ``stats["core_calls"]``."""
    if len(xs) > 1:
        try:
            base = State.cat(bases)
        except (ValueError, TypeError):
            base = None
        if base is not None:
            y, new = model.core(torch.cat(xs, dim=0), base)
            stats["core_calls"] += 1
            b = xs[0].shape[0]
            return [(y[k * b:(k + 1) * b], new.select(slice(k * b, (k + 1) * b))) for k in range(len(xs))]
    stats["core_calls"] += len(xs)
    return [model.core(x, s) for x, s in zip(xs, bases)]


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    num = (new - old).flatten(1).norm(dim=-1)
    den = new.flatten(1).norm(dim=-1).clamp_min(torch.finfo(new.dtype).tiny)
    return float((num / den).max())


@torch.no_grad()
def parallel_generate(model: RecurrentDepth, prompt: torch.Tensor, max_new_tokens: int, iterations: int | None = None,
                      exit_threshold: float | None = None, temperature: float = 0.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The prompt followed by ``max_new_tokens`` tokens (int64 [batch, time + new]) and the stats.

    ``iterations``: r, the core iterations a position has before its token is committed (default
    ``model.n_loops``). ``exit_threshold``: commit earlier once the relative latent change is below
    it. ``temperature``/``top_k``/``generator`` sample the committed tokens as ``model.generate``
    does (drafts are always greedy). The model must be in eval mode."""
    if not isinstance(model, RecurrentDepth):
        raise TypeError(f"parallel_generate needs a recurrent_depth model, got {type(model).__name__}")
    if model.training:
        raise ValueError("parallel_generate runs the model in eval mode (fixed depth, the eval s_0): call model.eval()")
    r = model.n_loops if iterations is None else iterations
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"iterations must be an int >= 1 (core iterations per committed token) or None "
                         f"(model.n_loops), got {iterations!r}")
    if exit_threshold is not None and (isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float))
                                       or not math.isfinite(exit_threshold) or exit_threshold < 0):
        raise ValueError(f"exit_threshold must be a finite number >= 0 (a relative latent change; the paper uses "
                         f"0.03) or None (always r iterations), got {exit_threshold!r}")
    check_sampling(max_new_tokens, temperature, top_k, model.vocab_size)
    check_tokens(prompt, model.vocab_size)
    if prompt.shape[1] == 0:
        raise ValueError(f"the prompt must hold at least one token per row, got shape {tuple(prompt.shape)}")
    stats = dict(passes=0, tokens=0, seconds=0.0, tokens_per_second=0.0, restarts=0, core_calls=0,
                 mean_iterations=0.0, emitted=[])
    if max_new_tokens == 0:
        return prompt.clone(), stats

    with _plain_depth(model, r):
        logits, state = model(prompt)  # the prompt, read by the model itself at depth r
    start = time.perf_counter()
    out = [_sample(logits[:, -1], temperature, top_k, generator)]
    prelude, coda = state["prelude"], state["coda"]
    memory = [state[f"iter{i}"] for i in range(r)]          # each iteration's memory through the committed tokens
    position = state["position"] if "position" in state else None  # tokens read per row (s_0's position)
    used: list[int] = []

    def enter(token: torch.Tensor, before: _Position | None, offset: int) -> _Position:
        """A new position reading ``token`` after ``before`` (None: after the committed tokens)."""
        x = token[:, None]
        e, pre = model.prelude(model.embed(x), prelude if before is None else before.prelude)
        where = None if position is None else (position + offset)[:, None]
        return _Position(token, e, model.initial_latent(e, where), pre)

    flight = [enter(out[0], None, 0)]
    while len(out) < max_new_tokens:
        stats["passes"] += 1
        # 1. one more iteration everywhere; position j's iteration d reads iteration d's memory
        # through position j-1, which is one iteration ahead (depths fall by >= 1 along the wavefront)
        bases = [memory[p.depth] if j == 0 else flight[j - 1].after[p.depth] for j, p in enumerate(flight)]
        steps = _core_rows(model, [model.adapter(torch.cat([p.s, p.e], dim=-1)) for p in flight], bases, stats)
        for p, (s, mem) in zip(flight, steps):
            p.change = _relative_change(s, p.s)
            p.s = s
            p.after.append(mem)
        # 2. commit the oldest positions that are done
        emitted = 0
        while flight and len(out) < max_new_tokens:
            head = flight[0]
            settled = exit_threshold is not None and head.depth >= 2 and head.change < exit_threshold
            if head.depth < r and not settled:
                break
            used.append(head.depth)
            if head.depth < r:  # the frozen latent still passes the remaining iterations' memories
                x = model.adapter(torch.cat([head.s, head.e], dim=-1))
                rest = _core_rows(model, [x] * (r - head.depth), memory[head.depth:], stats)
                head.after.extend(mem for _, mem in rest)
            memory, prelude = head.after, head.prelude
            h, coda = model.coda(model.norm(head.s), coda)
            token = _sample(model.head(model.norm(h))[:, -1], temperature, top_k, generator)
            out.append(token)
            emitted += 1
            position = None if position is None else position + 1
            flight.pop(0)
            if flight and not torch.equal(flight[0].token, token):  # it was started from another draft
                stats["restarts"] += 1
                flight = []
            if not flight:
                flight = [enter(token, None, 0)]
        stats["emitted"].append(emitted)
        if len(out) >= max_new_tokens:
            break
        # 3. drafts from the current latents (the committed coda memory is not advanced by them)
        h, _ = model.coda(model.norm(torch.cat([p.s for p in flight], dim=1)), coda)
        drafts = model.head(model.norm(h)).argmax(-1)  # [batch, positions in flight]
        for j in range(1, len(flight)):
            if not torch.equal(flight[j].token, drafts[:, j - 1]):
                stats["restarts"] += 1
                flight = flight[:j] + [enter(drafts[:, j - 1], flight[j - 1], j)]
                break
        # 4. a new position, if one more token is still to come
        if len(out) + len(flight) < max_new_tokens and flight[-1].depth >= 1:
            flight.append(enter(drafts[:, len(flight) - 1], flight[-1], len(flight)))

    seconds = time.perf_counter() - start
    new = len(out)
    stats.update(tokens=new, seconds=seconds, tokens_per_second=new / seconds if seconds > 0 else math.inf,
                 mean_iterations=sum(used) / len(used) if used else 0.0)
    return torch.cat([prompt, torch.stack(out, dim=1)], dim=1), stats


def agreement(tokens: torch.Tensor, reference: torch.Tensor, prompt_len: int) -> float:
    """The fraction of generated tokens (after ``prompt_len``) where two generations agree."""
    if tokens.shape != reference.shape:
        raise ValueError(f"agreement compares generations of one shape, got {tuple(tokens.shape)} and "
                         f"{tuple(reference.shape)}")
    a, b = tokens[:, prompt_len:], reference[:, prompt_len:]
    return float((a == b).double().mean()) if a.numel() else 1.0


__all__ = ["agreement", "parallel_generate"]
