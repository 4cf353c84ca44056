"""Token mixers (one file per family), channel mixers and norms. Importing this package
registers every one of them: the modules are listed here, explicitly, one per family."""

from recur.layers.base import Mixer
from recur.registry import load_modules

MODULES = (
    # token mixers, by family file
    "aaren", "attention", "bidirectional", "deltanet", "gateloop", "gla", "hgrn", "hgrn2", "indrnn", "lattice",
    "lightnet", "linear_attention", "longhorn", "lru", "mamba", "mamba2", "minrnn", "miras", "mlstm", "pgn",
    "retnet", "rglru", "rmc", "rnn", "rwkv4", "rwkv6", "rwkv7", "s4d", "scrn", "slstm", "titans", "tkan", "wrnn",
    # layer patterns (hybrid presets)
    "presets",
    # the other parts of a block
    "channel", "norms",
)
load_modules(__name__, MODULES)

__all__ = ["MODULES", "Mixer"]
