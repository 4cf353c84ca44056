"""recur: recurrent sequence models behind one contract, with exact and fast modes proven equal."""

__version__ = "0.1.0"

# The registries are filled here, by importing each package that registers components (each lists
# its modules explicitly); the registry module itself imports nothing of recur.
from recur.registry import (ARCHITECTURES, CHANNEL_MIXERS, METHODS, MIXERS, NORMS, PATTERNS, SPEED_CASES, TASKS,
                            Registry, build, hybrid, list_models, list_patterns, model_info, register,
                            register_pattern)
from recur.state import State
from recur.layers.base import Mixer
import recur.layers  # noqa: E402,F401 - mixers, channel mixers, norms, patterns
import recur.tasks  # noqa: E402,F401
from recur.models import Architecture, Backbone, Block, CausalLM, Encoder, LoopedLM, ModelOutput
import recur.training  # noqa: E402,F401 - the Trainer and the training methods


def list_archs() -> list[str]:
    """Names of all registered architectures, sorted."""
    return ARCHITECTURES.names()


__all__ = [
    "ARCHITECTURES", "Architecture", "Backbone", "Block", "CHANNEL_MIXERS", "CausalLM", "Encoder", "LoopedLM", "METHODS",
    "MIXERS", "Mixer", "ModelOutput", "NORMS", "PATTERNS", "Registry", "SPEED_CASES", "State", "TASKS", "build",
    "hybrid", "list_archs", "list_models", "list_patterns", "model_info", "register", "register_pattern",
]
