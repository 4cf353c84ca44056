"""Probe tasks: seeded, deterministic generators with disjoint train/test splits, one file per
family, registered in ``recur.registry.TASKS`` (listed here explicitly)."""

from recur.registry import load_modules
from recur.tasks.base import (Batch, Task, TaskParams, distinct_rows, get_task, list_tasks, register_task,
                              sample_rows_of_split, split_of, task_class)

MODULES = ("addition", "associative_retrieval", "copying", "dfa", "maze", "passkey", "recall", "set_disjointness", "state_tracking", "story_qa", "sudoku", "text", "tmaze", "chain_addition", "icl_regression", "scan", "nested_expressions", "strokes", "sort", "convex_hull", "digit_strings")
load_modules(__name__, MODULES)

__all__ = ["Batch", "MODULES", "Task", "TaskParams", "distinct_rows", "get_task", "list_tasks", "register_task",
           "sample_rows_of_split", "split_of", "task_class"]
