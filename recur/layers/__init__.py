"""Mixers, one file per family. Importing this package registers every mixer."""

import importlib
import pkgutil

from recur.layers.base import Mixer

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "common"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Mixer"]
