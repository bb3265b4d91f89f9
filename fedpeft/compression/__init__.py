"""Update compression (SPEC §2.3): codecs selected by name through :data:`CODECS`.

- ``golomb``: Golomb coding of kept positions as gaps;
- ``codec``: the :class:`Codec` interface, the payload container, :func:`decode_payload`;
- ``lossless`` (``none``), ``compeft`` (``compeft``, ``stc``): the codecs;
- ``error_feedback``: client-side error feedback and per-client residual stores;
- ``wire``: the payload as a ``uint8`` array in a Flower ``ArrayRecord``.

Every module is imported so its ``@CODECS.register`` runs: a new codec is one file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from fedpeft.config import RunConfig

import_submodules(__name__, __path__)


def build_codec(name: str, **options: float) -> Codec:
    """The codec registered as ``name`` (``none``, ``compeft``, ``stc``) with its options."""
    return CODECS.get(name)(**options)


def codec_for(settings: RunConfig) -> Codec:
    """The ``--compression`` codec with the run settings it declares (``Codec.options``).

    One builder for both directions: the upload stage (``stages/compression.py``) and the
    server's compressed broadcast (``--compress-down``) must encode with the same codec."""
    name = settings.compression
    return build_codec(name, **{o.name: getattr(settings, o.name) for o in CODECS.get(name).options})


__all__ = [
    "CODECS", "Codec", "DiskResidualStore", "ErrorFeedback", "InMemoryResidualStore",
    "ResidualStore", "State", "build_codec", "codec_for", "decode_payload", "error_feedback_step",
    "from_wire", "header_size", "to_wire",
]
