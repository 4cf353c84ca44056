"""``RecurForCausalLM``: any registered causal recur architecture as a Hugging Face causal LM.

    model = RecurForCausalLM.from_checkpoint("checkpoints/<run hash>")      # a `recur run` checkpoint
    model = RecurForCausalLM.from_recur(lm, model_config)                   # a recur model in memory
    model = RecurForCausalLM(RecurConfig(recur_model={"mixer": "gla"}, vocab_size=257))   # fresh weights
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)  # greedy / sampling / beams
    model.save_pretrained("out"); AutoModelForCausalLM.from_pretrained("out")   # after `import recur.hf`

The recur model is ``model.lm``, unchanged: ``forward`` calls it as ``recur``'s own ``generate``
does (the prompt in one call, then one token per call with the carried ``State``), so greedy
``generate`` gives exactly recur's tokens. The state travels in a ``RecurCache``.

Padding. A recurrent state has no mask: a pad token read into it stays there. So an attention
mask is honoured by where the state starts, not by masking scores:

* left padding (``0 0 1 1 1``, what batched generation uses): every row's state is reset at its
  first real token (``resets=``, packed-document support of every mixer), so the pad tokens
  before it never reach the state, and each row generates what its prompt alone would;
* right padding (``1 1 1 0 0``, what log-likelihood evaluation and training batches use): the
  logits at the real tokens are exact (the model is causal; later pads cannot reach them). The
  state after the row has read pads is not the row's state, so the returned cache is marked
  unusable: continuing from it raises instead of generating from pads;
* anything else (a gap inside a row, a row of pads only, padding in a continuation) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from recur.hf.cache import RecurCache
from recur.hf.config import RecurConfig
from recur.models.base import Architecture
from recur.registry import ARCHITECTURES

RIGHT_PADDED = ("this cache was computed over a right-padded batch: its state has read the pad tokens after "
                "each row's text, so generating from it would continue from padding. Pad prompts on the left "
                "to generate (tokenizer.padding_side = 'left'; recur.hf.byte_tokenizer() does)")


def build_architecture(config: RecurConfig) -> Architecture:
    """The recur model ``config`` describes, with fresh weights (recur's own initialisation)."""
    model_config = config.model_config()
    return ARCHITECTURES.get(model_config.arch).cls.from_config(model_config, vocab_size=config.vocab_size)


def padding_resets(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """``(resets, right_padded)`` for a call from the initial state: ``resets`` (bool [batch, time])
    is True at each row's first real token, None when no row is padded on the left (every row
    starts at the initial state anyway); ``right_padded`` is True when some row ends in padding.
    Rows must be ``0* 1+ 0*`` (one run of real tokens)."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} for a call "
                         f"without a cache, got {tuple(attention_mask.shape)} (a longer mask belongs to a "
                         "continuation: pass the cache of the previous call)")
    real = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    if bool(real.all()):
        return None, False
    starts = real.clone()
    starts[:, 1:] &= ~real[:, :-1]
    runs = starts.sum(dim=1)
    if bool((runs != 1).any()):
        row = int((runs != 1).nonzero()[0, 0])
        what = "no real token" if int(runs[row]) == 0 else "padding between real tokens"
        raise ValueError(f"attention_mask row {row} has {what}: a recurrent state cannot skip tokens, so each row "
                         "must be one run of real tokens with padding only before it (left padding, for "
                         "generation) or after it (right padding, for scoring): 0 ... 0 1 ... 1 0 ... 0")
    right_padded = bool((~real[:, -1]).any())
    return (starts if not bool(real[:, 0].all()) else None), right_padded


class RecurForCausalLM(PreTrainedModel, GenerationMixin):
    """A recur causal architecture (``self.lm``) behind transformers' causal-LM interface."""

    config_class = RecurConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    # A recurrent state cannot be rolled back: generate refuses assisted / speculative decoding.
    _is_stateful = True
    _no_split_modules = ["Block"]

    def __init__(self, config: RecurConfig, lm: Architecture | None = None):
        super().__init__(config)
        if lm is None:
            lm = build_architecture(config)
            dtype = getattr(torch, config.dtype) if isinstance(config.dtype, str) else config.dtype
            if isinstance(dtype, torch.dtype):
                # from_pretrained sets the dtype to load in (the saved one, or dtype=...). Some mixers
                # make a parameter float32 explicitly (Mamba's A_log); cast as recur's model.to(dtype)
                # does, or the loader would round a float64 checkpoint into them.
                lm = lm.to(dtype)
        else:
            check_matches(lm, config)
        self.lm = lm
        # The only sharing recur has: a tied head is the embedding matrix itself. Declared so that
        # save_pretrained writes it once and from_pretrained ties it again.
        shared = shared_parameters(lm)
        expected = {"head.weight": "embed.weight"} if config.tie_word_embeddings else {}
        if shared != expected:
            raise NotImplementedError(f"{type(lm).__name__} shares parameters {shared} (expected {expected} from "
                                      f"tie_embeddings={config.tie_word_embeddings}); RecurForCausalLM cannot save "
                                      "that sharing")
        self._tied_weights_keys = {f"lm.{k}": f"lm.{v}" for k, v in shared.items()}
        self.post_init()
        self._built = True  # from here on, a call of _init_weights means weights are missing

    # transformers' options that decode with a draft and roll the cache back on a rejection
    _ROLLBACK_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")

    def generate(self, *args, **kwargs):
        """transformers' ``generate``, refusing assisted / speculative decoding itself: a recurrent
        state cannot be reset to a previous subset of the text. (``_is_stateful`` made transformers
        refuse it up to 5.24; 5.25 fails earlier, on the missing cache, with a RuntimeError that
        does not say why.)"""
        config = kwargs.get("generation_config")
        asked = [k for k in self._ROLLBACK_OPTIONS
                 if kwargs.get(k) is not None or getattr(config, k, None) is not None]
        if asked:
            raise ValueError(f"recur models are stateful: their state cannot be rolled back to a previous subset "
                             f"of the generated text, so assisted / speculative decoding ({', '.join(asked)}) is "
                             "not supported; generate without it")
        return super().generate(*args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """False: the state is the model's own (a ``RecurCache`` made by ``forward``), not a DynamicCache."""
        return False

    def _init_weights(self, module) -> None:
        """Nothing while the model is built: every recur mixer initialises its own parameters
        (decays, gates, depth-scaled projections) in its constructor, and transformers' generic
        normal init would overwrite them. Called later, by ``from_pretrained`` for weights the file
        lacks (or whose shape differs, with ``ignore_mismatched_sizes``), it raises: those weights
        would stay uninitialised memory, and recur cannot re-initialise one module of a mixer apart."""
        if getattr(self, "_built", False):
            names = [n for n, _ in module.named_parameters(recurse=False)] or ["(buffers)"]
            raise ValueError(f"the checkpoint lacks weights of a {type(module).__name__} ({', '.join(names)}) or "
                             "has them in another shape: recur cannot initialise them apart from their model. Load "
                             "a complete checkpoint saved from this architecture and config")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_recur(cls, lm: Architecture, model_config: Any, vocab_size: int | None = None,
                   **config_kwargs) -> RecurForCausalLM:
        """Wrap the recur model ``lm`` (its weights are used, not copied) built from ``model_config``
        (a ``recur.config.ModelConfig``, its dict, or a ``RunConfig`` whose ``model`` is used).
        ``config_kwargs``: further ``RecurConfig`` fields (``bos_token_id``, ``eos_token_id``, ...)."""
        from recur.config import RunConfig

        if isinstance(model_config, RunConfig):
            model_config = model_config.model
        vocab_size = lm.vocab_size if vocab_size is None else vocab_size
        config = RecurConfig.from_model_config(model_config, vocab_size, **config_kwargs)
        config.dtype = lm.dtype
        model = cls(config, lm=lm)
        return model.train(lm.training)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **config_kwargs) -> RecurForCausalLM:
        """The model of a ``recur run --checkpoint-every N`` checkpoint (a run's folder or one step
        folder), in eval mode. A text task's checkpoint (bytes + BOS, ``recur.corpus``) gets BOS as
        its bos, eos and pad token: recur's text prompts start with BOS, and a generated BOS ends the
        document (``recur generate`` stops there); ``recur.hf.byte_tokenizer()`` is its tokenizer."""
        from recur.generate import is_text_task, load_checkpoint

        lm, task, cfg = load_checkpoint(path, device=device)
        if is_text_task(task) and task.encode(""):
            bos = task.encode("")[0]
            config_kwargs = {"bos_token_id": bos, "eos_token_id": bos, "pad_token_id": bos, **config_kwargs}
        return cls.from_recur(lm, cfg.model, task.vocab_size, **config_kwargs).eval()

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self):
        return self.lm.embed

    def set_input_embeddings(self, value):
        self.lm.embed = value

    def get_output_embeddings(self):
        return self.lm.head

    def set_output_embeddings(self, value):
        self.lm.head = value

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: RecurCache | None = None, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, is_first_iteration: bool = False,
                                      **kwargs) -> dict[str, Any]:
        """What ``forward`` reads at each step of ``generate``: the tokens not yet read (the last
        ``next_sequence_length``; all of them in the first call), the cache and the attention mask,
        and every other keyword as given (as transformers' own version forwards them, but
        ``labels``). transformers' general version also builds position ids, 4-D masks for static
        caches and multimodal inputs, none of which a recur model reads; skipping them took
        greedy generate from 1.19x to 1.15x recur's own time for a 2-layer LSTM LM at d_model 128
        (7 against 21 us a call on a 2-core CPU; transformers' whole loop adds about 0.2 ms a token)."""
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        device = self.device
        if input_ids.device != device:
            input_ids = input_ids.to(device)
        inputs = {k: v for k, v in kwargs.items() if k != "labels"}
        inputs.update(input_ids=input_ids, cache=cache, attention_mask=attention_mask,
                      inputs_embeds=inputs_embeds if is_first_iteration else None)
        return inputs

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: RecurCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                inputs_embeds: torch.Tensor | None = None, past_key_values: RecurCache | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` [batch, time] read from ``cache`` (None: the initial state).

        ``attention_mask``: see the module docstring (left padding resets each row at its first
        token; right padding gives exact logits and an unusable cache). With a cache, the mask may
        cover the tokens read before (transformers' convention); the new tokens must all be real.
        ``logits_to_keep``: n > 0 returns the last n positions' logits, a tensor the positions it
        indexes (the head runs on every position, as recur's generate computes it, so the tokens
        match bit for bit). ``labels``: the shifted cross-entropy of transformers' causal LMs (-100
        ignored; ``kwargs`` such as ``num_items_in_batch`` go to it). ``return_dict=False``: the
        tuple (loss if labels, logits, cache if use_cache). ``position_ids`` is not an
        argument, so that generate does not build one per step: positions live in the state
        (attention's KV cache counts its own); one passed anyway is ignored."""
        if inputs_embeds is not None:
            raise ValueError("recur models read token ids: pass input_ids, not inputs_embeds")
        if output_attentions or output_hidden_states:
            raise ValueError("recur models return neither attention weights nor hidden states "
                             "(output_attentions / output_hidden_states)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        cache = past_key_values if cache is None else cache
        if cache is not None and not isinstance(cache, RecurCache):
            raise TypeError(f"cache must be a RecurCache (from a previous call of this model), got "
                            f"{type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None:
            cache.check_usable()
        state = None if cache is None else cache.state
        resets, right_padded = None, False
        if attention_mask is not None:
            if state is None:
                if attention_mask.shape[1] != input_ids.shape[1] and cache is not None:
                    attention_mask = attention_mask[:, -input_ids.shape[1]:]  # an empty cache: only the new part
                resets, right_padded = padding_resets(attention_mask, input_ids)
            elif not bool(attention_mask[:, -input_ids.shape[1]:].bool().all()):
                raise ValueError("padding among the tokens that continue a cache: a recurrent state cannot skip "
                                 "tokens; pad prompts on the left, before the first call")
        out = self.lm(input_ids, state) if resets is None else self.lm(input_ids, state, resets=resets)
        logits = out.logits
        new_cache = None
        if use_cache:
            new_cache = cache if cache is not None else RecurCache()
            new_cache.update(out.state, input_ids.shape[1])
            new_cache.unusable = RIGHT_PADDED if right_padded else None
        loss = None
        if labels is not None:
            kwargs.pop("position_ids", None)
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        elif logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=new_cache)
        return out.to_tuple() if return_dict is False else out


def shared_parameters(module: torch.nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every parameter reachable under more than one name."""
    first: dict[int, str] = {}
    shared = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            shared[name] = first[id(p)]
        else:
            first[id(p)] = name
    return shared


def check_matches(lm: Any, config: RecurConfig) -> None:
    """``lm`` is the architecture ``config`` describes: its class, and the names and shapes of
    its parameters and buffers as a model built from the config has them (built on the meta
    device: no memory, no initialisation)."""
    model_config = config.model_config()
    cls = ARCHITECTURES.get(model_config.arch).cls
    if not isinstance(lm, cls):
        raise TypeError(f"the recur model is a {type(lm).__name__}, but the config's architecture "
                        f"{model_config.arch!r} is {cls.__name__}")
    with torch.device("meta"):
        reference = build_architecture(config)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        shown = ", ".join(f"{k} (config: {want.get(k)}, model: {got.get(k)})" for k in diff[:4])
        raise ValueError(f"the recur model does not match its config (model {model_config.name!r}, d_model "
                         f"{model_config.d_model}, n_layers {model_config.n_layers}, vocab_size {config.vocab_size}): "
                         f"{shown}{' ...' if len(diff) > 4 else ''}")
