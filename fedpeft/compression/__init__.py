"""Update compression (SPEC §2.3): codecs selected by name through :data:`CODECS`.

- ``golomb``: Golomb coding of kept positions as gaps;
- ``codec``: the :class:`Codec` interface, the payload container, :func:`decode_payload`;
- ``lossless`` (``none``), ``compeft`` (``compeft``, ``stc``): the codecs;
- ``error_feedback``: client-side error feedback and per-client residual stores;
- ``wire``: the payload as a ``uint8`` array in a Flower ``ArrayRecord``.

Every module is imported so its ``@CODECS.register`` runs: a new codec is one file.
"""

from fedpeft.compression.codec import CODECS, Codec, State, decode_payload, header_size
from fedpeft.compression.error_feedback import (
    DiskResidualStore,
    ErrorFeedback,
    InMemoryResidualStore,
    ResidualStore,
    error_feedback_step,
)
from fedpeft.compression.wire import from_wire, to_wire
from fedpeft.plugins import import_submodules

import_submodules(__name__, __path__)


def build_codec(name: str, **options: float) -> Codec:
    """The codec registered as ``name`` (``none``, ``compeft``, ``stc``) with its options."""
    return CODECS.get(name)(**options)


__all__ = [
    "CODECS", "Codec", "DiskResidualStore", "ErrorFeedback", "InMemoryResidualStore",
    "ResidualStore", "State", "build_codec", "decode_payload", "error_feedback_step",
    "from_wire", "header_size", "to_wire",
]
