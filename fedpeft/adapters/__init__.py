"""Parameter-efficient adapters, selected by name through :data:`ADAPTERS`.

Every module here is imported so its ``@ADAPTERS.register`` runs: a new adapter is one file.
"""

from fedpeft.adapters.base import Adapter, AdapterSpec, State
from fedpeft.adapters.registry import ADAPTERS
from fedpeft.plugins import import_submodules

import_submodules(__name__, __path__)


def build_adapter(name: str, spec: AdapterSpec) -> Adapter:
    return ADAPTERS.get(name)(spec)


__all__ = ["ADAPTERS", "Adapter", "AdapterSpec", "State", "build_adapter"]
