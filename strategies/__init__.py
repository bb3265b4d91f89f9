"""Server strategies (Flower strategies over ArrayRecord/MetricRecord/ConfigRecord), selected
by name through :data:`fedpeft.strategy.STRATEGIES`. Every module here is imported so its
``@STRATEGIES.register`` runs: a new strategy is one new file that subclasses
:class:`fedpeft.strategy.FedPeftStrategy` and depends on fedpeft's core only."""

from fedpeft.plugins import import_submodules
from fedpeft.strategy import STRATEGIES, ClientUpdate, FedPeftStrategy

import_submodules(__name__, __path__)

__all__ = ["STRATEGIES", "ClientUpdate", "FedPeftStrategy"]
