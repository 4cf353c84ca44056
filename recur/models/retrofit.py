"""Retrofitted recurrence: a trained fixed-depth ``causal_lm`` turned into a ``recurrent_depth``
model (McLeish et al., "Teaching Pretrained Language Models to Think Deeper with Retrofitted
Recurrence", 2025; reference ``LoopedLMs/retrofitting-recurrence``,
``convert_pretrained_model/convert_llama.py``).

    rd = retrofit(lm, prelude=2, core=4, coda=2, n_loops=4, mean_loops=None, init="zeros")

From the L layers of ``lm`` (a Backbone of pre-norm Blocks):

    prelude = layers [0, prelude)                      the first layers
    core    = layers [L - coda - core, L - coda)       the layers just before the coda, looped r times
    coda    = layers [L - coda, L)                     the last layers

as the reference maps TinyLlama's 22 layers to (4, 8, 4): prelude 0-3, core 10-17, coda 18-21,
and layers 4-9 are dropped. With prelude + core + coda = L no layer is dropped. Explicit index
lists (``prelude=[0, 1]``, ...) choose any other layers. The embedding, the final norm and the head
are copied (tied stays tied); every copied module is an independent copy (``lm`` is untouched,
and a shared block of ``shared_blocks`` becomes one copy per layer that ran it).

**Adapter** (W: Linear(2d -> d) over [s_{i-1}; e]), by ``adapter``:
- ``"sum"`` (default): W = [I | I], so s_i = Core(s_{i-1} + e), the additive input injection of
  looped transformers. With s_0 = 0 (``init="zeros"``) the first iteration is Core(e) exactly: at
  r = 1 the retrofitted model computes the original's layers (up to the norm below), and later
  iterations start as "run the core again on its output plus the input".
- ``"embedding"``: W = [0 | I], s_i = Core(e) at every iteration whatever s_0 (the same r = 1
  start for any ``init``; every iteration then repeats the first until training changes W).
- ``"random"``: W keeps the fresh initialisation of ``recurrent_depth``. The reference conversion
  does this: it copies the embedding, the head, the final norm and the layers into a fresh Huginn
  model and leaves the adapter at its initialisation, and training (a curriculum of recurrences,
  the ``curriculum`` method with ``key: n_loops``) learns it.

**Not exactly the original at r = 1.** ``recurrent_depth`` computes head(norm(Coda(norm(s_r))))
(Huginn's final norm used twice), so even with the "sum" adapter, s_0 = 0 and r = 1 the coda reads
norm(h) where the original reads h: the retrofitted model equals the original lm with its final
norm also applied before its last ``coda`` layers (tested exactly in float64), not the original.
Making it exact needs a switch in ``recurrent_depth`` that skips the norm before the coda.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from recur.models.blocks import Backbone
from recur.models.causal_lm import CausalLM
from recur.models.recurrent_depth import RecurrentDepth

ADAPTERS = ("sum", "embedding", "random")


def _indices(name: str, spec, default: list[int], n_layers: int) -> list[int]:
    """A section's layer indices: ``default`` for an int count, or the given list."""
    if isinstance(spec, bool) or not isinstance(spec, (int, Sequence)) or isinstance(spec, str):
        raise ValueError(f"{name} must be a number of layers (an int >= 1) or a list of layer indices of the "
                         f"original lm, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"{name} must be >= 1 layers, got {spec}")
        return default
    idx = list(spec)
    if not idx or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in idx):
        raise ValueError(f"{name} must be a non-empty list of layer indices in [0, {n_layers}), got {spec!r}")
    return idx


def _section(source: Backbone, idx: list[int]) -> Backbone:
    """A Backbone holding independent copies of ``source``'s layers ``idx``, in that order (built
    from the copies, not from options: the lm's mixer options are not stored on it)."""
    section = Backbone.__new__(Backbone)
    nn.Module.__init__(section)
    section.d_model, section.causal = source.d_model, source.causal
    section.layer_names = [source.layer_names[i] for i in idx]
    section.n_layers = len(idx)
    section.blocks = nn.ModuleList(copy.deepcopy(source.layers[i]) for i in idx)
    section.order = list(range(len(idx)))
    return section


def retrofit(lm: CausalLM, prelude=2, core=4, coda=2, adapter: str = "sum", **recurrent_depth_options) -> RecurrentDepth:
    """A ``recurrent_depth`` model from the layers of ``lm`` (see the module's docstring).
    ``recurrent_depth_options``: ``n_loops``, ``mean_loops``, ``init``, ``bptt_loops``, ... of
    ``RecurrentDepth`` (not its sizes, pattern or parts, which come from ``lm``)."""
    if not isinstance(lm, CausalLM) or isinstance(lm, RecurrentDepth):
        raise TypeError(f"retrofit takes a fixed-depth causal_lm, got {type(lm).__name__}")
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)} (its initialisation), got {adapter!r}")
    fixed = {"vocab_size", "d_model", "n_layers", "n_core", "n_prelude", "n_coda", "pattern", "mixer_config", "mlp",
             "mlp_ratio", "norm", "channel_options", "tie_embeddings"} & set(recurrent_depth_options)
    if fixed:
        raise ValueError(f"retrofit takes the sizes and parts from the lm; drop {', '.join(sorted(fixed))} "
                         f"(the sections are prelude=, core=, coda=)")
    L = lm.backbone.n_layers
    counts = [s if isinstance(s, int) and not isinstance(s, bool) else 0 for s in (prelude, core, coda)]
    if all(isinstance(s, int) and not isinstance(s, bool) for s in (prelude, core, coda)) and sum(counts) > L:
        raise ValueError(f"prelude={prelude} + core={core} + coda={coda} layers exceed the lm's n_layers={L}")
    p_idx = _indices("prelude", prelude, list(range(counts[0])), L)
    k_idx = _indices("core", core, list(range(L - counts[2] - counts[1], L - counts[2])), L)
    c_idx = _indices("coda", coda, list(range(L - counts[2], L)), L)

    tied = lm.head.weight is lm.embed.weight
    d = lm.embed.embedding_dim
    # Built with the core's mixers and no channel mixer (cheap); every section is replaced by copies.
    model = RecurrentDepth(lm.vocab_size, d, n_layers=len(k_idx), pattern=[lm.backbone.layer_names[i] for i in k_idx],
                           mlp=None, n_prelude=len(p_idx), n_coda=len(c_idx), **recurrent_depth_options)
    model.prelude = _section(lm.backbone, p_idx)
    model.backbone = _section(lm.backbone, k_idx)
    model.coda = _section(lm.backbone, c_idx)
    model.embed = copy.deepcopy(lm.embed)
    model.norm = copy.deepcopy(lm.norm)
    model.head = copy.deepcopy(lm.head)
    if tied:
        model.head.weight = model.embed.weight
    with torch.no_grad():
        model.adapter.weight.data = model.adapter.weight.data.to(lm.embed.weight)
        if adapter != "random":
            eye = torch.eye(d, dtype=model.adapter.weight.dtype, device=model.adapter.weight.device)
            model.adapter.weight.copy_(torch.cat([eye if adapter == "sum" else torch.zeros_like(eye), eye], dim=1))
    return model.train(lm.training)


__all__ = ["ADAPTERS", "retrofit"]
