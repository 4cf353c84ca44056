"""The one Trainer (hooks) and the training methods that plug into it."""

from recur.training.method import Method, MethodParams
from recur.training.trainer import ConfigError, RunResult, Trainer, build, evaluate, train
from recur.training import methods  # noqa: E402,F401 - registers the methods

__all__ = ["ConfigError", "Method", "MethodParams", "RunResult", "Trainer", "build", "evaluate", "methods", "train"]
