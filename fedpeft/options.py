"""Run settings owned by a component (a strategy, codec or pipeline stage).

A component declares the ``RunConfig`` fields it reads as :class:`Option` s, each with its
validity rule, next to the code that uses them. Settings validation checks every declared
option of every registered component (so a bad value is refused even when the component is
not selected), and ``tests/test_options.py`` checks that each declared option is a real
setting with a CLI flag and a TOML key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedpeft.errors import UsageError


@dataclass(frozen=True)
class Option:
    """One setting a component reads: its ``RunConfig`` field name and what is allowed."""

    name: str
    valid: Callable[[Any], bool]
    allowed: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, cfg: Any) -> None:
        value = getattr(cfg, self.name)
        if not self.valid(value):
            raise UsageError(f"{self.flag} {value!r} is invalid; allowed: {self.allowed}")


def positive(name: str) -> Option:
    return Option(name, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative(name: str) -> Option:
    return Option(name, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def choice(name: str, *allowed: str) -> Option:
    return Option(name, lambda v: v in allowed, ", ".join(allowed))


def check_options(components: list[type], cfg: Any) -> None:
    """Every option every one of ``components`` declares (``options`` class attribute)."""
    for component in components:
        for option in getattr(component, "options", ()):
            option.check(cfg)


__all__ = ["Option", "check_options", "choice", "non_negative", "positive"]
