"""recur: recurrent sequence models behind one contract, with exact and fast modes proven equal."""

from recur.registry import build, hybrid, list_models, list_patterns, model_info, register, register_pattern
from recur.state import State
from recur.layers.base import Mixer
from recur.models import Backbone, Block, CausalLM

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "Block",
    "CausalLM",
    "Mixer",
    "State",
    "build",
    "hybrid",
    "list_models",
    "list_patterns",
    "model_info",
    "register",
    "register_pattern",
]
