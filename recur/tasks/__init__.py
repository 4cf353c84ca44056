"""Synthetic probe tasks: seeded, deterministic generators with disjoint train/test splits."""

from recur.tasks.base import (Batch, Task, TaskParams, distinct_rows, get_task, list_tasks, register_task,
                              sample_rows_of_split, split_of, task_class)

__all__ = ["Batch", "Task", "TaskParams", "distinct_rows", "get_task", "list_tasks", "register_task", "sample_rows_of_split", "split_of", "task_class"]
