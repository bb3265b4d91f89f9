"""Learning tasks (``--task``), selected by name through :data:`TASKS`.

Every module here is imported so its ``@TASKS.register`` runs: a new task is one file.
"""

from functools import lru_cache

from fedpeft.plugins import import_submodules
from fedpeft.tasks.base import ACCURACY, DEFAULT_TASK, TASKS, Metric, Task

import_submodules(__name__, __path__, skip=("base",))


@lru_cache(maxsize=None)
def get_task(name: str) -> Task:
    """The (stateless) task object named ``name``; a one-line UsageError for an unknown name."""
    return TASKS.get(name)()


def all_metrics() -> list[Metric]:
    """Every registered task's metrics, each once (by name): the default task's first, then the
    others' in name order (the column order of comparison.csv)."""
    seen: dict[str, Metric] = {}
    for name in sorted(TASKS.names(), key=lambda n: n != DEFAULT_TASK):
        for metric in TASKS.get(name).metrics:
            seen.setdefault(metric.name, metric)
    return list(seen.values())


__all__ = ["ACCURACY", "DEFAULT_TASK", "TASKS", "Metric", "Task", "all_metrics", "get_task"]
