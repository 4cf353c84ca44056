"""recur: recurrent sequence models behind one contract, with exact and fast modes proven equal."""

from recur.registry import build, list_models, list_patterns, model_info, register, register_pattern
from recur.state import State
from recur.layers.base import Mixer

__version__ = "0.1.0"

__all__ = [
    "Mixer",
    "State",
    "build",
    "list_models",
    "list_patterns",
    "model_info",
    "register",
    "register_pattern",
]
