"""Parameter-efficient adapters, selected by name through :data:`ADAPTERS`."""

from fedpeft.adapters.base import Adapter, AdapterSpec, State
from fedpeft.adapters.registry import ADAPTERS
from fedpeft.adapters import lora as _lora  # noqa: F401  (registers "lora")


def build_adapter(name: str, spec: AdapterSpec) -> Adapter:
    return ADAPTERS.get(name)(spec)


__all__ = ["ADAPTERS", "Adapter", "AdapterSpec", "State", "build_adapter"]
