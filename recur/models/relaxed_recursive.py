"""``relaxed_recursive``: a Recursive Transformer (``n_unique`` shared blocks applied to give
``n_layers`` effective layers) with an optional per-(layer, loop) LoRA relaxing the tying (Bae et
al., "Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA", 2024).

    h_0 = E x
    h_l = Block_{s(l)}(h_{l-1} + e_{k(l)};  W_{s(l)} + B_{s(l),k(l)} A_{s(l),k(l)})     l = 1 .. n_layers
    logits = W_head norm(h_L)

``s(l)``: the shared block effective layer l runs, by the sharing ``strategy`` (K = n_unique,
L = n_layers, N_r = L / K loops):

* ``cycle``: blocks 0..K-1 repeated N_r times (s(l) = l mod K);
* ``sequence``: each block repeated N_r times in a row (s(l) = l div N_r);
* ``middle_cycle``: the first and last layers keep blocks of their own, the L - 2 middle layers
  cycle through the K - 2 middle blocks (the paper's best strategy).

``k(l)``: which use of its block layer l is (0 for the first use, 1 for the second, ...): the loop
index. Every nn.Linear inside the shared blocks (the mixer's projections and the MLP's) gets one
rank-r adapter per use (``recur.models.lora``, ``lora_rank=r``; 0 is plain tying), and
``loop_embedding=True`` adds a learned vector e_k (zero-initialised, shared by the blocks, the
"recursion encoding") before each application.

Converting a trained ``causal_lm`` (``from_causal_lm``, or ``model.args.init_from=<checkpoint>``
from the command line): embedding, final norm and head are copied; each shared parameter is the
mean of the tied layers' (the paper's average initialisation); with ``lora_init="svd"`` adapter
k(l) of every Linear is the rank-r SVD of the residual W_l - W_shared (the paper's SVD init: at full
rank the converted model is the original), with ``"random"`` plain LoRA (B = 0: plain tying).

State: every effective layer is a causal pass with its own mixer memory, so the state is keyed
per application, ``State(layer0=..., ..., layer{L-1}=..., [channel{i}=...])``, as a Backbone of L
layers keys it: carrying it equals one call on the concatenation, and generation streams.

Deviations and choices:

* Only nn.Linear weights are relaxed (as the paper relaxes q, k, v, o, gate, up, down). Norms,
  biases and a mixer's raw weight tensors (LSTM's weight_ih / weight_hh, block-diagonal gates,
  ...) stay shared, initialised to the mean: the full-rank SVD conversion reproduces the original
  exactly only where those are equal across the tied layers. Buffers and fixed settings (e.g.
  HGRN's depth-set forget-gate lower bound) come from the block's first use, with a warning when
  the tied layers' differ.
* The loop embedding is one table indexed by the loop (shared by the blocks), zero-initialised so
  a converted model starts as the original.
* The stepwise / lower "selection" initialisations and the adaption-prompt relaxation of the
  reference code are not implemented; ``middle_sequence`` neither.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.models.base import ModelOutput, check_positions, check_tokens
from recur.models.causal_lm import CausalLM
from recur.models.lora import LORA_INITS, add_lora, lora_linears, set_adapter
from recur.models.loops import check_state_entries
from recur.registry import ARCHITECTURES, resolve_pattern
from recur.state import State

STRATEGIES = ("cycle", "sequence", "middle_cycle")


def sharing_order(strategy: str, n_layers: int, n_unique: int) -> list[int]:
    """The shared block each effective layer runs (``s(l)`` of the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    positive_int("n_unique", n_unique)
    if n_unique > n_layers:
        raise ValueError(f"n_unique must be <= n_layers={n_layers}, got {n_unique}")
    if strategy == "middle_cycle":
        if n_unique < 3 and n_unique != n_layers:
            raise ValueError(f"strategy='middle_cycle' keeps the first and last layers unique and shares the middle "
                             f"ones, so n_unique must be >= 3 (or = n_layers), got {n_unique}")
        if n_unique == n_layers:
            return list(range(n_layers))
        if (n_layers - 2) % (n_unique - 2):
            raise ValueError(f"strategy='middle_cycle': the {n_layers - 2} middle layers must be a multiple of the "
                             f"{n_unique - 2} middle blocks (n_unique - 2)")
        return [0] + [1 + (i - 1) % (n_unique - 2) for i in range(1, n_layers - 1)] + [n_unique - 1]
    if n_layers % n_unique:
        raise ValueError(f"strategy={strategy!r}: n_layers={n_layers} must be a multiple of n_unique={n_unique} "
                         "(the number of loops is n_layers / n_unique)")
    if strategy == "cycle":
        return [i % n_unique for i in range(n_layers)]
    return [i // (n_layers // n_unique) for i in range(n_layers)]


def loop_indices(order: list[int]) -> list[int]:
    """``k(l)``: how many earlier layers ran the same block (the loop, and the adapter, of layer l)."""
    seen: dict[int, int] = {}
    out = []
    for j in order:
        out.append(seen.get(j, 0))
        seen[j] = out[-1] + 1
    return out


@ARCHITECTURES.register("relaxed_recursive", family="depth-recurrent",
                        paper="Bae et al., Relaxed Recursive Transformers: Effective Parameter Sharing with "
                              "Layer-wise LoRA (2024)")
class RelaxedRecursive(CausalLM):
    """Recursive Transformer: shared blocks tied across layers by a sharing strategy, relaxed by per-(layer, loop) LoRA.

    ``n_unique`` blocks run as ``n_layers`` effective layers; optional learned loop embedding."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, n_unique: int = 1, strategy: str = "cycle",
                 lora_rank: int = 0, lora_init: str = "random", loop_embedding: bool = False):
        positive_int("n_layers", n_layers)
        order = sharing_order(strategy, n_layers, n_unique)
        names = resolve_pattern(pattern)
        layer_names = [names[i % len(names)] for i in range(n_layers)]
        if lora_init != "random":
            raise ValueError(f"lora_init={lora_init!r}: a model built from scratch has random LoRA (A Kaiming, B = 0); "
                             "'svd' needs the original layers: RelaxedRecursive.from_causal_lm(lm, ...) or "
                             "model.args.init_from=<causal_lm checkpoint>")
        super().__init__(vocab_size, d_model, n_unique, _block_names(layer_names, order, n_unique), mixer_config,
                         mlp=mlp, mlp_ratio=mlp_ratio, tie_embeddings=tie_embeddings, norm=norm,
                         channel_options=channel_options)
        self._relax(order, layer_names, strategy, lora_rank, loop_embedding)

    def _relax(self, order: list[int], layer_names: list[str], strategy: str, lora_rank: int,
               loop_embedding: bool) -> None:
        """Make the Backbone (holding the n_unique shared blocks) run them as the effective layers
        ``order``, and add the adapters and the loop embedding."""
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0 (0: plain tying), got {lora_rank!r}")
        b = self.backbone
        # The Backbone's layers / mixers / init_state / state_size / set_mode all read ``order``:
        # with it set to the effective layers they describe the L applications (a state per layer).
        b.order, b.n_layers, b.layer_names = list(order), len(order), list(layer_names)
        self.strategy, self.lora_rank = strategy, lora_rank
        self.loops = loop_indices(order)
        if lora_rank:
            for j, block in enumerate(b.blocks):
                owner = f"relaxed_recursive block {j} ({layer_names[order.index(j)]!r})"
                add_lora(block, order.count(j), lora_rank, owner=owner)
        w = self.embed.weight
        self.loop_embed = (nn.Parameter(torch.zeros(max(self.loops) + 1, w.shape[1], dtype=w.dtype, device=w.device))
                           if loop_embedding else None)

    @property
    def n_unique(self) -> int:
        return len(self.backbone.blocks)

    def _state_keys(self) -> list[str]:
        keys = []
        for i, block in enumerate(self.backbone.layers):
            keys += [f"layer{i}"] + ([f"channel{i}"] if block.stateful_channel else [])
        return keys

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        check_state_entries(state, self._state_keys(), "relaxed_recursive",
                            f"n_layers={self.backbone.n_layers}")
        get = (lambda k: None) if state is None else state.get
        x = self.embed(tokens)
        new = {}
        for i, (j, k) in enumerate(zip(self.backbone.order, self.loops)):
            block = self.backbone.blocks[j]
            if self.loop_embed is not None:
                x = x + self.loop_embed[k]
            set_adapter(block, k)
            x, new[f"layer{i}"], ch = block(x, get(f"layer{i}"), get(f"channel{i}"), resets=resets)
            if ch is not None:
                new[f"channel{i}"] = ch
        return self.output(x, State(new), positions)

    # -- conversion of a trained causal_lm --------------------------------------
    @classmethod
    def from_causal_lm(cls, lm: CausalLM, n_unique: int, strategy: str = "cycle", lora_rank: int = 0,
                       lora_init: str = "svd", loop_embedding: bool = False) -> RelaxedRecursive:
        """A relaxed recursive model from a trained ``causal_lm`` of the same depth: embedding, norm
        and head copied, shared weights the mean of the tied layers', adapters by ``lora_init``
        (``svd``: rank-r SVD of each layer's residual; ``random``: B = 0). ``lm`` is left untouched."""
        if type(lm) is not CausalLM:
            raise TypeError(f"from_causal_lm converts a causal_lm (recur.models.CausalLM), got {type(lm).__name__}")
        if lora_init not in LORA_INITS:
            raise ValueError(f"lora_init must be one of {', '.join(LORA_INITS)}, got {lora_init!r}")
        originals = lm.backbone.layers
        order = sharing_order(strategy, len(originals), n_unique)
        layer_names = list(lm.backbone.layer_names)
        _block_names(layer_names, order, n_unique)  # the tied layers must run the same mixer
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.vocab_size = lm.vocab_size
        # one deepcopy of the three keeps a tied head tied to the copied embedding
        model.embed, model.norm, model.head = copy.deepcopy((lm.embed, lm.norm, lm.head))
        backbone = copy.deepcopy(lm.backbone)  # its blocks are replaced by the shared ones below
        uses = [[i for i, s in enumerate(order) if s == j] for j in range(n_unique)]
        blocks = []
        with torch.no_grad():
            _warn_if_constants_differ(originals, uses)
            for j, layers in enumerate(uses):
                block = copy.deepcopy(originals[layers[0]])
                tied = [dict(originals[i].named_parameters()) for i in layers]
                for name, p in block.named_parameters():
                    p.copy_(torch.stack([t[name] for t in tied]).mean(0))  # average initialisation
                blocks.append(block)
        backbone.blocks = nn.ModuleList(blocks)
        model.backbone = backbone
        model._relax(order, layer_names, strategy, lora_rank, loop_embedding)
        if lora_rank and lora_init == "svd":
            loops = model.loops
            for j, block in enumerate(model.backbone.blocks):
                for name, lora in lora_linears(block):
                    for i in uses[j]:
                        lora.init_svd(loops[i], originals[i].get_submodule(name).weight)
        return model.train(lm.training)

    @classmethod
    def from_config(cls, config, vocab_size: int, **io) -> RelaxedRecursive:
        """From a ModelConfig; ``model.args.init_from=<path>`` (a ``causal_lm`` run's checkpoint folder,
        a step folder, or a checkpoint dir holding one run; see ``recur generate --checkpoint``)
        converts that trained model instead of building a fresh one: the run's model.mixer, d_model,
        n_layers, mixer_args, block and tie_embeddings must be the checkpoint's."""
        from recur.models.base import _model_config

        config = _model_config(config)
        args = dict(config.args)
        path = args.pop("init_from", None)
        if path is None:
            return super().from_config(config, vocab_size, **io)
        from recur.generate import load_checkpoint

        lm, _, source = load_checkpoint(path, device="cpu")
        if source.model.arch != "causal_lm":
            raise ValueError(f"model.args.init_from={path!r} holds a {source.model.arch!r} model; "
                             "it must be a causal_lm")
        if lm.vocab_size != vocab_size:
            raise ValueError(f"model.args.init_from={path!r}: its vocab_size is {lm.vocab_size}, "
                             f"this task's {vocab_size}")
        fields = ("mixer", "d_model", "n_layers", "mixer_args", "block", "tie_embeddings")
        differ = [f"model.{f} ({getattr(config, f)!r} here, {getattr(source.model, f)!r} there)"
                  for f in fields if getattr(config, f) != getattr(source.model, f)]
        if differ:
            raise ValueError(f"model.args.init_from={path!r}: the converted model is the checkpoint's, so these must "
                             f"match it: {', '.join(differ)}")
        unknown = set(args) - {"n_unique", "strategy", "lora_rank", "lora_init", "loop_embedding"}
        if unknown:
            raise TypeError(f"relaxed_recursive with init_from takes n_unique, strategy, lora_rank, lora_init, "
                            f"loop_embedding; got {', '.join(sorted(unknown))}")
        if "n_unique" not in args:
            raise ValueError("model.args.init_from needs model.args.n_unique (the number of shared blocks)")
        return cls.from_causal_lm(lm, **args).train()

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> RelaxedRecursive:
        model = cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="gla", n_unique=1,
                    lora_rank=2, loop_embedding=True)
        # B = 0 and e = 0 at init would hide the adapters and the loop embedding from the suite's
        # equality tests: start them away from zero
        with torch.no_grad():
            for _, lora in lora_linears(model):
                lora.lora_B.normal_(0.0, 0.1)
            model.loop_embed.normal_(0.0, 0.1)
        return model


def _warn_if_constants_differ(originals, uses: list[list[int]]) -> None:
    """Tied layers whose fixed settings (their repr: e.g. HGRN's depth-set lower bound) or buffers
    differ cannot all be kept: the shared block has its first use's, which a user should know."""
    def same(a, b) -> bool:
        ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
        return repr(a) == repr(b) and ba.keys() == bb.keys() and all(torch.equal(ba[n], bb[n]) for n in ba)

    groups = [layers for layers in uses if not all(same(originals[layers[0]], originals[i]) for i in layers[1:])]
    if groups:
        listed = "; ".join(f"layers {', '.join(map(str, g))} (keeping layer {g[0]}'s)" for g in groups)
        warnings.warn(f"relaxed_recursive: tied layers differ in their fixed settings or buffers (e.g. a "
                      f"depth-dependent constant), and a shared block keeps its first use's: {listed}", stacklevel=3)


def _block_names(layer_names: list[str], order: list[int], n_unique: int) -> list[str]:
    """The mixer of each shared block; the layers tied to one block must all run that mixer."""
    names = []
    for j in range(n_unique):
        used = sorted({layer_names[i] for i, s in enumerate(order) if s == j})
        if len(used) != 1:
            raise ValueError(f"shared block {j} would run the layers {[i for i, s in enumerate(order) if s == j]}, "
                             f"whose mixers differ ({', '.join(used)}): choose a pattern, n_unique and strategy that "
                             "tie layers of one mixer")
        names.append(used[0])
    return names


__all__ = ["RelaxedRecursive", "STRATEGIES", "loop_indices", "sharing_order"]
