"""Downstream tasks for `smoe finetune`, by name."""

from __future__ import annotations

from smoe.launcher.downstream.tasks.base import Classifier, Split, Task, TaskModel, model_family
from smoe.launcher.downstream.tasks.csqa import CSQA
from smoe.launcher.downstream.tasks.mwp import MAWPS, SVAMP, ASDivA
from smoe.launcher.downstream.tasks.sst2 import SST2

TASKS: dict[str, type[Task]] = {task.name: task for task in (SST2, CSQA, ASDivA, MAWPS, SVAMP)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task '{name}' is unknown: use one of {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Classifier", "Split", "Task", "TaskModel", "get_task", "model_family"]
