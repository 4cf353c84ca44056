"""``RecurConfig``: a recur model's whole config as a Hugging Face ``PretrainedConfig``.

    config = RecurConfig(recur_model={"mixer": "gla", "d_model": 64, "n_layers": 2}, vocab_size=257)
    config.recur_model        # the full recur.config.ModelConfig as a dict (every field, defaults included)
    config.model_config()     # ... as a validated recur.config.ModelConfig
    config.save_pretrained("out")   # config.json with model_type "recur"

``recur_model`` is the ``model`` section of a ``RunConfig`` (architecture, mixer or layer pattern,
sizes, mixer options, block parts, architecture options, tied head), so ``config.json`` rebuilds any
registered causal architecture exactly as ``recur run`` built it. It is validated and written out in
full when the config is made (every ``ModelConfig`` field, defaults included), so a later change of
one of those defaults does not change what a saved folder rebuilds. A mixer's own option defaults
are the mixer's, as in a recur checkpoint; a change there that alters a shape fails the load loudly.

The HF-side fields are derived from it, never set apart: ``hidden_size`` and ``num_hidden_layers``
(read by tools that size things by them) and ``tie_word_embeddings`` (which tells ``save_pretrained``
/ ``from_pretrained`` that the head shares the embedding). ``use_cache`` is a field of its own:
transformers 5 no longer supplies it, and ``generate`` reads it from the config.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from recur.models.base import Generator
from recur.registry import ARCHITECTURES, MIXERS, resolve_pattern


class RecurConfig(PretrainedConfig):
    """A recur causal architecture (``recur_model``: a ``recur.config.ModelConfig`` as a dict) and its vocabulary.

    ``RecurConfig()`` without ``recur_model`` is a valid, empty config (transformers builds one to
    find which fields differ from the defaults); a model cannot be built from it.
    """

    model_type = "recur"

    recur_model: dict | None = None
    vocab_size: int = 257
    use_cache: bool = True
    tie_word_embeddings: bool = False
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.recur_model is not None:
            model = check_model_config(self.recur_model)
            self.recur_model = model.model_dump(mode="json")
            derived = {"hidden_size": model.d_model, "num_hidden_layers": model.n_layers,
                       "tie_word_embeddings": model.tie_embeddings}
            for key, value in derived.items():
                given = getattr(self, key)
                # None / False: not given (the defaults); anything else must agree with the recur model
                if given not in (None, False) and given != value:
                    raise ValueError(f"{key}={given!r} contradicts the recur model ({value!r}); it is derived from "
                                     "recur_model (d_model, n_layers, tie_embeddings): set it there")
                setattr(self, key, value)
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {self.vocab_size!r}")
        super().__post_init__(**kwargs)

    def model_config(self):
        """``recur_model`` as a validated ``recur.config.ModelConfig``."""
        if self.recur_model is None:
            raise ValueError("this RecurConfig holds no recur model (recur_model=None): build it with "
                             "RecurConfig(recur_model={'mixer': ..., 'd_model': ...}, vocab_size=...) or "
                             "RecurConfig.from_model_config(model_config, vocab_size)")
        return check_model_config(self.recur_model)

    @classmethod
    def from_model_config(cls, model_config: Any, vocab_size: int, **kwargs) -> RecurConfig:
        """From a ``recur.config.ModelConfig`` (or its dict) and the vocabulary size; ``kwargs`` are
        further config fields (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ...)."""
        if hasattr(model_config, "model_dump"):
            model_config = model_config.model_dump(mode="json")
        return cls(recur_model=model_config, vocab_size=vocab_size, **kwargs)


def check_model_config(model: Any):
    """``model`` (a ``ModelConfig`` or its dict) validated, for an architecture that ``generate`` can
    drive: a registered autoregressive architecture whose mixers are all causal. A bidirectional
    mixer or an encoder would let a position read the tokens after it, so next-token logits and
    generation would be meaningless: refused here, before any weight is built."""
    from recur.config import ModelConfig
    from recur.models.base import _model_config

    model = model if isinstance(model, ModelConfig) else _model_config(model)
    arch = ARCHITECTURES.get(model.arch).cls
    if not (getattr(arch, "autoregressive", False) and issubclass(arch, Generator)):
        causal = [n for n in ARCHITECTURES.names()
                  if getattr(ARCHITECTURES.get(n).cls, "autoregressive", False)
                  and issubclass(ARCHITECTURES.get(n).cls, Generator)]
        raise ValueError(f"architecture {model.arch!r} is not a causal language model (it does not generate "
                         f"token by token), so it has no Hugging Face causal-LM form; the causal architectures "
                         f"are: {', '.join(causal)}")
    names = resolve_pattern(model.mixer)
    bidirectional = [n for n in dict.fromkeys(names) if not getattr(MIXERS.get(n).cls, "causal", True)]
    if bidirectional:
        raise ValueError(f"mixer {', '.join(repr(n) for n in bidirectional)} is not causal (an encoder layer that "
                         "reads the future): a causal language model cannot use it; see "
                         "recur.list_models(causal=True) for the mixers it can")
    return model
