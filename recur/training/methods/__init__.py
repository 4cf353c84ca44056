"""Training methods, one file each, registered in ``recur.registry.METHODS`` (listed here explicitly)."""

from recur.registry import load_modules

MODULES = ("state_noise", "state_passing", "tbptt", "gradient_noise", "curriculum", "twin")
load_modules(__name__, MODULES)

__all__ = ["MODULES"]
