"""``--compression none``: the update as raw little-endian float32 bytes.

The baseline of every bits-per-parameter comparison (32 bits per parameter plus the
header). Lossless for float32, float16 and bfloat16 updates; a float64 update is rounded
to float32 (what a client would ship anyway).
"""

from __future__ import annotations

import numpy as np

from fedpeft.compression.codec import CODECS, Codec


@CODECS.register("none")
class LosslessCodec(Codec):
    name = "none"

    def _encode_body(self, flat: np.ndarray) -> bytes:
        return flat.astype("<f4").tobytes()

    def _decode_body(self, body: memoryview, numel: int) -> np.ndarray:
        if len(body) != 4 * numel:
            raise ValueError(f"lossless body has {len(body)} bytes, expected {4 * numel}")
        return np.frombuffer(body, dtype="<f4").astype(np.float32)

    def _reconstruct(self, flat: np.ndarray) -> np.ndarray:
        return flat.astype(np.float32)
