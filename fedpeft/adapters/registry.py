"""``--adapter`` name -> Adapter class."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.adapters.base import Adapter

ADAPTERS: Registry[type[Adapter]] = Registry("adapter")
