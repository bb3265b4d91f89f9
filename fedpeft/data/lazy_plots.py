"""Import flwr-datasets without its plotting helpers.

``flwr_datasets/__init__`` imports ``flwr_datasets.visualization``, which pulls matplotlib,
seaborn and scipy.stats (about 0.4 s of every process start on the 2-core host, by
``python -X importtime``; with Opacus imported lazily too, a run's imports went from
7.1–8.0 s to 6.5–7.2 s, 3 runs each), for plots fedpeft never draws (it uses the partitioners only).
:func:`defer_flwr_datasets_plots` puts a stand-in module in its place that imports the real
one the first time anyone reads an attribute of it, so code that does use those plots still
gets them.
"""

from __future__ import annotations

import importlib
import sys
import types

_NAME = "flwr_datasets.visualization"


class _Deferred(types.ModuleType):
    def __getattr__(self, attr: str) -> object:
        if attr.startswith("__"):  # module introspection (__file__, __path__, ...) is not use
            raise AttributeError(attr)
        if sys.modules.get(_NAME) is self:
            del sys.modules[_NAME]
        real = importlib.import_module(_NAME)
        package = sys.modules.get("flwr_datasets")
        if package is not None:
            package.visualization = real
        return getattr(real, attr)


def defer_flwr_datasets_plots() -> None:
    """Call before the first ``import flwr_datasets``; no effect after it."""
    if "flwr_datasets" not in sys.modules and _NAME not in sys.modules:
        sys.modules[_NAME] = _Deferred(_NAME)
