"""The built-in update-pipeline stages (:mod:`fedpeft.pipeline`). Every module here is
imported so its ``@STAGES.register`` runs: a new stage is one new file."""

from fedpeft.plugins import import_submodules

import_submodules(__name__, __path__)
