r"""Hugging Face transformers integration: any causal recur model as a ``PreTrainedModel``.

    import recur.hf                                  # registers "recur" with AutoConfig / AutoModelForCausalLM
    model = recur.hf.RecurForCausalLM.from_checkpoint("checkpoints/<run hash>")
    tok = recur.hf.byte_tokenizer()                  # recur's text models: bytes + BOS
    model.generate(**tok(["def ", "class "], return_tensors="pt", padding=True), max_new_tokens=32)
    model.save_pretrained("out"); tok.save_pretrained("out")
    AutoModelForCausalLM.from_pretrained("out")      # offline, safetensors, bit-identical

Needs the ``hf`` extra (``pip install 'recur[hf]'``: transformers 5.23 or later, before 6);
``import recur`` never imports transformers. Importing this package registers the model type
``recur`` in-process (AutoConfig, AutoModelForCausalLM); a saved folder then loads with the Auto
classes in any process that has imported ``recur.hf``.

lm-eval-harness (``pip install lm-eval accelerate``; not a dependency of recur) scores it through
its ``HFLM`` wrapper, from Python::

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=8, add_bos_token=True)
    simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="my_tasks"))

or from its command line, once this package is imported (the model type is registered in-process)::

    python -c "import recur.hf; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" --model hf \
        --model_args pretrained=out,backend=causal,add_bos_token=True --tasks my_task \
        --include_path my_tasks --device cpu

Files: ``config`` (RecurConfig), ``cache`` (RecurCache, the State between steps), ``model``
(RecurForCausalLM, padding), ``tokenizer`` (byte_tokenizer).
"""

from __future__ import annotations

REQUIRES = ("5.23", "6")  # the hf extra's range: transformers>=5.23,<6


def _check_transformers() -> None:
    """A clear ImportError when transformers is absent or outside the supported range (5.x changed
    the cache argument, the config dataclasses and serialisation: an older one fails obscurely)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("recur.hf needs Hugging Face transformers, which is not installed: "
                          "pip install 'recur[hf]'") from e
    from packaging.version import Version

    found = Version(transformers.__version__)
    if not Version(REQUIRES[0]) <= found < Version(REQUIRES[1]):
        raise ImportError(f"recur.hf needs transformers>={REQUIRES[0]},<{REQUIRES[1]}, found "
                          f"{transformers.__version__}: pip install 'recur[hf]'")


_check_transformers()

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from recur.hf.cache import RecurCache  # noqa: E402
from recur.hf.config import RecurConfig  # noqa: E402
from recur.hf.model import RecurForCausalLM, padding_resets  # noqa: E402
from recur.hf.tokenizer import BOS, byte_tokenizer  # noqa: E402

# exist_ok: importing this module again (importlib.reload, a test) re-registers the same classes.
AutoConfig.register(RecurConfig.model_type, RecurConfig, exist_ok=True)
AutoModelForCausalLM.register(RecurConfig, RecurForCausalLM, exist_ok=True)

__all__ = ["BOS", "RecurCache", "RecurConfig", "RecurForCausalLM", "byte_tokenizer", "padding_resets"]
