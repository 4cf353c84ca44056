"""Architectures above the mixer, one file each, registered in ``recur.registry.ARCHITECTURES``
(listed here explicitly), plus the Blocks and Backbone they are built from."""

from recur.models.base import Architecture, ModelOutput
from recur.models.blocks import Backbone, Block
from recur.registry import load_modules

MODULES = ("causal_lm", "looped_lm", "encoder", "block_recurrent", "memn2n", "rmt", "armt", "hmt", "lcirc", "rate", "universal_transformer", "recurrent_depth", "ilr", "rmoe", "global_workspace", "relaxed_recursive", "hrm", "trm", "seq2seq", "recat", "mdn", "hierarchical_byte", "megabyte", "hnet", "pointer", "ctc", "transducer")
load_modules(__name__, MODULES)

from recur.models.causal_lm import CausalLM  # noqa: E402 - registered above
from recur.models.encoder import Encoder  # noqa: E402
from recur.models.looped_lm import LoopedLM  # noqa: E402

__all__ = ["Architecture", "Backbone", "Block", "CausalLM", "Encoder", "LoopedLM", "MODULES", "ModelOutput"]
