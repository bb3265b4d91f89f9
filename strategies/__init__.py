"""Server strategies (Flower strategies over ArrayRecord/MetricRecord/ConfigRecord),
selected by name through :data:`STRATEGIES`."""

from strategies.registry import STRATEGIES
from strategies.base import ClientUpdate, FedPeftStrategy
from strategies import fedavg as _fedavg  # noqa: F401  (registers "fedavg")

__all__ = ["STRATEGIES", "ClientUpdate", "FedPeftStrategy"]
