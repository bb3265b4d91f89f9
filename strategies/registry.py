"""``--strategy`` name -> strategy class."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.registry import Registry

if TYPE_CHECKING:
    from strategies.base import FedPeftStrategy

STRATEGIES: Registry[type[FedPeftStrategy]] = Registry("strategy")
