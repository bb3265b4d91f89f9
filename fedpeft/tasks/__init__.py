"""Learning tasks (``--task``), selected by name through :data:`TASKS`.

Every module here is imported so its ``@TASKS.register`` runs: a new task is one file.
"""

from functools import lru_cache

from fedpeft.plugins import import_submodules
from fedpeft.tasks.base import DEFAULT_TASK, TASKS, Task

import_submodules(__name__, __path__, skip=("base",))


@lru_cache(maxsize=None)
def get_task(name: str) -> Task:
    """The (stateless) task object named ``name``; a one-line UsageError for an unknown name."""
    return TASKS.get(name)()


__all__ = ["DEFAULT_TASK", "TASKS", "Task", "get_task"]
