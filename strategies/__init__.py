"""Server strategies (Flower strategies over ArrayRecord/MetricRecord/ConfigRecord),
selected by name through :data:`STRATEGIES`. Every module here is imported so its
``@STRATEGIES.register`` runs: a new strategy is one new file."""

from fedpeft.plugins import import_submodules
from strategies.base import ClientUpdate, FedPeftStrategy
from strategies.registry import STRATEGIES

import_submodules(__name__, __path__)

__all__ = ["STRATEGIES", "ClientUpdate", "FedPeftStrategy"]
