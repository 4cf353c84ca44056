"""``recurrent_depth``: a prelude, one core block looped r times over a latent state, and a coda
(Huginn; Geiping et al., "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth
Approach", 2025; reference ``seal-rg/recurrent-pretraining``, ``recpre/raven_modeling_minimal.py``).

    e   = Prelude(E x)                                  n_prelude layers
    s_0 ~ TruncNormal(0, init_std^2, truncated at +-3 init_std), per token and channel
    s_i = Core(W [s_{i-1} ; e])   for i = 1 .. r        n_layers (= n_core) layers, W: Linear(2d -> d), no bias
    logits = W_head norm(Coda(norm(s_r)))               n_coda layers; ``norm`` the same module twice

The parameters do not grow with r. Every iteration is a causal pass over the sequence with its
own mixer memory, so the state is keyed per iteration:

    State(prelude=<Backbone state>, iter0=..., iter{r-1}=<core Backbone state>, coda=<Backbone state>,
          position=int64 [batch],                     # unless init="zeros": tokens read per row
          probe1=..., probe{r-1}=<coda Backbone state>)  # only with exit_threshold, in eval mode

Carrying it across calls equals one call on the concatenation, and stepping streams.

**Depth r.** In eval mode r = ``n_loops`` (settable after training: more loops at test time than in
training). In training mode, with ``mean_loops`` set, r is drawn per call from the Poisson-lognormal
schedule of the reference's ``randomized_iteration_sampler``:

    tau ~ LogNormal(mu = log(mean_loops - 1) - sigma^2 / 2, sigma),  r = min(Poisson(tau) + 1, 3 mean_loops)

from torch's global CPU RNG, or from ``model.generator`` (a ``torch.Generator``) when set. So
E[r] = mean_loops (up to the cap, which the reference's other sampler applies and which keeps
a rare long draw from stalling a CPU run). The reference writes mu = log(mean_recurrence) and
adds 1 after the draw, so its E[r] is mean_recurrence + 1 (33 for its 32): here ``mean_loops``
is the mean it names. A call that continues a state keeps the state's r (a sequence read in
segments runs at one depth). ``mean_loops=None`` trains at r = n_loops. ``bptt_loops=k``: the
first max(r - k, 0) iterations run under ``torch.no_grad()`` and gradients flow through the last
min(k, r) only (the reference's truncated backprop through depth; None: through all).

**Initial latent s_0.** The reference draws fresh noise per call (``initialize_state``). A fresh
draw per call would make the output depend on where calls begin, which breaks carry and streaming,
so ``init`` chooses:
- ``"random"`` (default): training draws fresh truncated-normal noise per call (global RNG or
  ``model.generator``), as the paper does; eval mode uses the ``"seeded"`` noise.
- ``"seeded"``: s_0[t] is a hash of (``init_seed``, the token's position in its document, the
  channel), mapped to the truncated normal by its inverse CDF: a function of the position, not of
  call boundaries, and the same in every row of a batch. The state then carries the position
  (``position``, reset by ``resets``). The conformance suite needs this (or "zeros"): its fast path
  and reference see the same s_0 at every split.
- ``"zeros"``: s_0 = 0 (the reference's ``deterministic=True``); no position is carried.
``init_std`` defaults to 0.02, the std of the embedding here: the reference draws s_0 at the
scale of its embeddings ("like-init", std sqrt(2/(5d)) times its embedding scale sqrt(d)).

**Adaptive exit** (eval mode only, ``exit_threshold`` set; the reference's ``KLExitEvaluator``
"auto" criterion, 1e-3). After each iteration i the coda reads the latents (a probe with its own
mixer state per iteration, ``probe{i}``) and gives q_i = softmax(logits of s_i). A token exits after
iteration i >= 2 when KL(q_i || q_{i-1}) < exit_threshold: its latent is frozen (later iterations
still run over the whole sequence, so the compute stays parallel and causal, but leave its latent
as it is), and the final coda reads the frozen latents. ``out.aux["exit_iterations"]`` (int64
[batch, time]) is the number of iterations each token used. Off in training mode.

Interpretations: the library's pre-norm Block stands in for the reference's SandwichBlock
(``x = n2(attn(n1 x) + x)``, four norms), and there is no sqrt(d) embedding scale (the embedding is
N(0, 0.02) as in every recur LM); the optional test-time noise injection is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.models.base import ModelOutput, check_positions, check_tokens
from recur.models.blocks import Backbone
from recur.models.causal_lm import CausalLM
from recur.registry import ARCHITECTURES
from recur.state import State

INITS = ("random", "seeded", "zeros")
_MASK = 0xFFFFFFFF
_LOW = 0.5 * math.erfc(3 / math.sqrt(2))  # Phi(-3): the truncated normal's lower tail


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors (multipliers < 2^31, so no product overflows)."""
    x = x & _MASK
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK
    return x ^ (x >> 16)


def truncated_normal(u: torch.Tensor, std: float) -> torch.Tensor:
    """Uniforms ``u`` in (0, 1) to N(0, std^2) truncated at +-3 std, by the inverse CDF (float64)."""
    p = _LOW + u.double() * (1 - 2 * _LOW)
    return std * math.sqrt(2) * torch.erfinv(2 * p - 1)


def seeded_noise(seed: int, position: torch.Tensor, d: int, std: float) -> torch.Tensor:
    """Truncated-normal noise [*position.shape, d] that depends only on (seed, position, channel)."""
    channel = torch.arange(d, device=position.device)
    h = _hash32(_hash32(position[..., None] + _hash32(torch.tensor(seed, device=position.device)))
                + channel * 0x61C88647)
    return truncated_normal((h.double() + 0.5) / 2 ** 32, std)


def kl_divergence(logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || softmax(previous)) over the last axis, in float32 or better."""
    logp = torch.log_softmax(logits.double() if logits.dtype == torch.float64 else logits.float(), -1)
    logq = torch.log_softmax(previous.to(logp.dtype), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@ARCHITECTURES.register("recurrent_depth", family="depth-recurrent",
                        paper="Geiping et al., Scaling up Test-Time Compute with Latent Reasoning: "
                              "A Recurrent Depth Approach (2025)")
class RecurrentDepth(CausalLM):
    """Prelude -> core block looped r times over a latent (adapter over [state; embedding]) -> coda
    -> head; r random in training, ``n_loops`` in eval, optional per-token KL exit (Huginn)."""

    depth_option = "n_loops"

    def __init__(self, vocab_size: int, d_model: int, n_layers: int | None = None, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, n_core: int | None = None,
                 n_prelude: int = 1, n_coda: int = 1, n_loops: int = 4, mean_loops: float | None = 4.0,
                 sigma: float = 0.5, bptt_loops: int | None = None, init: str = "random",
                 init_std: float = 0.02, init_seed: int = 0, exit_threshold: float | None = None):
        if n_core is not None and n_layers is not None and n_core != n_layers:
            raise ValueError(f"n_core={n_core!r} disagrees with n_layers={n_layers}: the core's depth is "
                             "n_layers (model.n_layers); give one of them")
        n_layers = n_core if n_core is not None else 1 if n_layers is None else n_layers
        positive_int("n_prelude", n_prelude)
        positive_int("n_coda", n_coda)
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)} (the initial latent s_0), got {init!r}")
        if (isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not math.isfinite(init_std)
                or init_std < 0):
            raise ValueError(f"init_std must be a finite number >= 0 (the std of s_0), got {init_std!r}")
        if isinstance(init_seed, bool) or not isinstance(init_seed, int):
            raise ValueError(f"init_seed must be an int (it fixes the seeded s_0), got {init_seed!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0 (the log-normal's sigma), got {sigma!r}")
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options)
        parts = dict(mixer_config=mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                     channel_options=channel_options)
        self.prelude = Backbone(d_model, n_prelude, pattern, **parts)
        self.coda = Backbone(d_model, n_coda, pattern, **parts)
        self.adapter = nn.Linear(2 * d_model, d_model, bias=False)
        self.n_loops, self.mean_loops, self.bptt_loops, self.exit_threshold = n_loops, mean_loops, bptt_loops, exit_threshold
        self.sigma, self.init, self.init_std, self.init_seed = float(sigma), init, float(init_std), init_seed
        self.generator: torch.Generator | None = None  # draws r and the training s_0 when set

    # -- options settable after training ---------------------------------------
    @property
    def core(self) -> Backbone:
        """The looped block (``self.backbone``, n_layers deep)."""
        return self.backbone

    @property
    def n_loops(self) -> int:
        return self._n_loops

    @n_loops.setter
    def n_loops(self, value: int) -> None:
        self._n_loops = positive_int("n_loops", value)

    @property
    def mean_loops(self) -> float | None:
        return self._mean_loops

    @mean_loops.setter
    def mean_loops(self, value) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 1):
            raise ValueError(f"mean_loops must be a number > 1 (E[r] of the training schedule) or None "
                             f"(train at r = n_loops), got {value!r}")
        self._mean_loops = value

    @property
    def bptt_loops(self) -> int | None:
        return self._bptt_loops

    @bptt_loops.setter
    def bptt_loops(self, value) -> None:
        self._bptt_loops = positive_int("bptt_loops", value, optional=True)

    @property
    def exit_threshold(self) -> float | None:
        return self._exit_threshold

    @exit_threshold.setter
    def exit_threshold(self, value) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"exit_threshold must be a finite number >= 0 (a KL between successive "
                             f"iterations' distributions; the reference uses 1e-3) or None, got {value!r}")
        self._exit_threshold = value

    # -- state -----------------------------------------------------------------
    @property
    def exiting(self) -> bool:
        return self.exit_threshold is not None and not self.training

    def _keys(self, r: int) -> set[str]:
        keys = {"prelude", "coda", *(f"iter{i}" for i in range(r))}
        if self.init != "zeros":
            keys.add("position")
        if self.exiting:
            keys |= {f"probe{i}" for i in range(1, r)}
        return keys

    @property
    def mixers(self):
        return self.prelude.mixers + self.core.mixers * self.n_loops + self.coda.mixers

    def set_mode(self, mode: str) -> None:
        for backbone in (self.prelude, self.core, self.coda):
            backbone.set_mode(mode)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        entries = {"prelude": self.prelude.init_state(batch_size, device=device, dtype=dtype),
                   **{f"iter{i}": self.core.init_state(batch_size, device=device, dtype=dtype)
                      for i in range(self.n_loops)},
                   "coda": self.coda.init_state(batch_size, device=device, dtype=dtype)}
        if self.init != "zeros":
            entries["position"] = torch.zeros(batch_size, dtype=torch.int64, device=device)
        if self.exiting:
            entries |= {f"probe{i}": self.coda.init_state(batch_size, device=device, dtype=dtype)
                        for i in range(1, self.n_loops)}
        return State(entries)

    def state_size(self, seq_len: int) -> int:
        probes = (self.n_loops - 1) * self.coda.state_size(seq_len) if self.exiting else 0
        return (self.prelude.state_size(seq_len) + self.n_loops * self.core.state_size(seq_len)
                + self.coda.state_size(seq_len) + probes)

    # -- the schedule and s_0 ----------------------------------------------------
    def sample_loops(self) -> int:
        """One draw of r from the Poisson-lognormal schedule (E[r] = mean_loops, capped at 3 mean_loops)."""
        if self.mean_loops is None:
            return self.n_loops
        mu = math.log(self.mean_loops - 1) - self.sigma ** 2 / 2
        tau = torch.exp(mu + self.sigma * torch.randn((), generator=self.generator, dtype=torch.float64))
        r = int(torch.poisson(tau.reshape(1), generator=self.generator).item()) + 1
        return min(r, max(1, int(3 * self.mean_loops)))

    def _positions(self, tokens: torch.Tensor, start: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
        """Each token's position in its document, int64 [batch, time] (``start``: tokens already read)."""
        t = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        pos = start[:, None] + t
        if resets is not None:
            last = torch.where(resets, t, torch.full_like(t, -1)).cummax(dim=1).values
            pos = torch.where(last >= 0, t - last, pos)
        return pos

    def initial_latent(self, e: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """s_0 [batch, time, d_model] for prelude outputs ``e`` (see the module's docstring)."""
        if self.init == "zeros":
            return torch.zeros_like(e)
        if self.init == "random" and self.training:
            u = torch.rand(e.shape, generator=self.generator, dtype=torch.float64)
            return truncated_normal(u, self.init_std).to(e)
        return seeded_noise(self.init_seed, positions, e.shape[-1], self.init_std).to(e)

    # -- forward -----------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        if state is None:
            r = self.sample_loops() if self.training else self.n_loops
        else:
            if not isinstance(state, State):
                raise ValueError(f"recurrent_depth state must be a State (from init_state or a previous call), "
                                 f"got {type(state).__name__}")
            # a continued sequence keeps its depth while training with random r; eval runs n_loops
            r = (sum(1 for k in state if k.startswith("iter"))
                 if self.training and self.mean_loops is not None else self.n_loops)
            if set(state) != self._keys(r):
                raise ValueError(f"recurrent_depth state must have entries {sorted(self._keys(r))} (r={r} "
                                 f"iterations; from init_state or a previous call), got {sorted(state)}")
        get = (lambda k: None) if state is None else state.get
        new = {}
        e, new["prelude"] = self.prelude(self.embed(tokens), get("prelude"), resets=resets)
        where = None
        if self.init != "zeros":
            start = get("position")
            start = torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device) if start is None else start
            where = self._positions(tokens, start, resets)
            new["position"] = where[:, -1] + 1 if tokens.shape[1] else start
        s = self.initial_latent(e, where)
        with_grad = r if self.bptt_loops is None else min(self.bptt_loops, r)
        previous, used, done = None, None, None
        for i in range(r):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= r - with_grad):
                step, new[f"iter{i}"] = self.core(self.adapter(torch.cat([s, e], dim=-1)), get(f"iter{i}"),
                                                  resets=resets)
            if done is not None:
                step = torch.where(done[..., None], s, step)  # exited tokens keep their latent
            s = step
            if self.exiting and i < r - 1:
                probe, new[f"probe{i + 1}"] = self.coda(self.norm(s), get(f"probe{i + 1}"), resets=resets)
                logits = self.head(self.norm(probe))
                if previous is None:
                    done = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
                    used = torch.full(tokens.shape, r, dtype=torch.int64, device=tokens.device)
                else:
                    now = ~done & (kl_divergence(logits, previous) < self.exit_threshold)
                    used = torch.where(now, i + 1, used)
                    done = done | now
                previous = logits
        h, new["coda"] = self.coda(self.norm(s), get("coda"), resets=resets)
        out = self.output(h, State(new), positions)
        if self.exiting:
            out.aux["exit_iterations"] = used if used is not None else torch.full(tokens.shape, r, dtype=torch.int64,
                                                                                  device=tokens.device)
        return out

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> RecurrentDepth:
        """One layer each, r = 3 in training too, seeded s_0 and backprop through the last 2 iterations."""
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", n_loops=3, mean_loops=None,
                   bptt_loops=2, init="seeded", init_std=0.5)
