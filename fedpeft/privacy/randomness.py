"""Where a run's privacy randomness comes from (SPEC §3.4).

A DP guarantee holds only against someone who cannot regenerate the mechanism's random draws.
Everything the guarantee relies on — the server's Gaussian noise, the adaptive-clip count noise,
the Poisson cohort — is therefore expanded from a 256-bit key drawn from the OS CSPRNG
(:func:`secrets.token_bytes`), never from the public ``--seed``: the seed is written to
results.json and sent to every client. The key lives only in this object and in the server's
checkpoint (``checkpoint/privacy.key``, mode 0600), so a resumed run keeps its key.

A noise draw is never reused with different inputs (issue 24, finding 4). Deriving a round's
noise from (key, round) alone made a round re-run after a resume draw the SAME noise: if the
re-run differed in who returned (dropout, timeout, crash), the two released models differed by
exactly the dropped clients' clipped sum / qN — no noise at all. Each :class:`SecretStreams`
object therefore also holds a 128-bit nonce drawn from the OS CSPRNG when it is created (a run's
start, each resume: one attempt at the rounds it runs) and never stored: every attempt at a round
draws a fresh cohort and fresh noise, an independent run of the Poisson-sampled Gaussian
mechanism. The accountant counts every attempt that could have released something
(``fedpeft.engine.checkpoint``'s attempt ledger), so a re-run round costs one more round of ε
instead of leaking. Within one attempt the same (purpose, round) still gives the same draws.

Each stream is ``HMAC-SHA256(key, purpose ‖ index ‖ nonce)``, used as the seed of the PRNG that
draws the round's values. Knowing some streams' outputs reveals nothing about the key or any
other stream (HMAC is a PRF).

:class:`SeededStreams` is the non-private path and the explicit research opt-in
``--insecure-reproducible-noise``: the same streams derived from ``--seed`` exactly as earlier
fedpeft versions did (non-private runs keep their results). Such a run carries NO privacy
guarantee against anyone who knows the seed, and says so in its results; being reproducible, a
round it re-runs after a resume draws the same noise again (so a re-run with other replies
exposes their difference).

Clients draw their own secrets for DP-SGD noise and Poisson batches
(:func:`client_secret_seeds`); in a real federation the server never learns them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from fedpeft.atomic import write_private
from fedpeft.errors import UsageError

KEY_BYTES = 32
NONCE_BYTES = 16
KEY_FILE = "privacy.key"

#: Stream purposes. The numbers are the domain-separation constants of the seeded derivation
#: (kept from earlier versions so that non-private runs reproduce their old results).
COHORT = "cohort"
SERVER_NOISE = "server-noise"
_SEEDED_TAGS = {COHORT: 0x5A3B1E, SERVER_NOISE: 0xD9}

SECRET = "secret"
SEEDED_INSECURE = "seeded-insecure"
SEEDED_WARNING = ("privacy noise, cohorts and DP-SGD batches are derived from the public --seed "
                  "(--insecure-reproducible-noise): the privacy guarantee does NOT hold against "
                  "anyone who knows the seed")


class RandomStreams(ABC):
    """Named, per-round random streams of one run."""

    #: ``"secret"`` or ``"seeded-insecure"`` (recorded in results.json under DP).
    kind: str

    @abstractmethod
    def numpy(self, purpose: str, index: int) -> np.random.Generator:
        """The generator of ``purpose`` for round ``index`` (same arguments, same draws)."""

    @abstractmethod
    def torch(self, purpose: str, index: int) -> torch.Generator:
        """A torch CPU generator for ``purpose`` in round ``index``."""


class SecretStreams(RandomStreams):
    """Streams expanded from a secret key and this attempt's nonce with HMAC-SHA256 (neither is
    ever published; only the key is kept, in the server's checkpoint)."""

    kind = SECRET

    def __init__(self, key: bytes | None, path: Path | None = None) -> None:
        """``key``, or None and the ``path`` of a key file read on first use (:meth:`load`)."""
        if key is not None and len(key) != KEY_BYTES:
            raise ValueError(f"privacy key must be {KEY_BYTES} bytes, got {len(key)}")
        if key is None and path is None:
            raise ValueError("a privacy key or the path of its file is needed")
        self._key = None if key is None else bytes(key)
        self._path = path
        # one per object, i.e. per run start or resume: an attempt never reuses another's draws
        self._nonce = secrets.token_bytes(NONCE_BYTES)

    def _secret(self) -> bytes:
        """The key; a loaded checkpoint's is read from its file now, at first use — after the
        process pool has forked its template (fedpeft/federation/process_pool.py), so no
        simulation worker ever holds it."""
        if self._key is None:
            assert self._path is not None
            try:
                key = self._path.read_bytes()
            except OSError as exc:
                raise UsageError(f"the privacy key {str(self._path)!r} cannot be read ({exc.strerror})") from None
            if len(key) != KEY_BYTES:
                raise UsageError(f"{str(self._path)!r} is not a privacy key ({len(key)} bytes, expected {KEY_BYTES})")
            self._key = key
        return self._key

    @classmethod
    def fresh(cls) -> SecretStreams:
        """A new key from the OS CSPRNG."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def _digest(self, purpose: str, index: int) -> bytes:
        msg = purpose.encode() + b"\x00" + struct.pack(">q", int(index)) + self._nonce
        return hmac.new(self._secret(), msg, hashlib.sha256).digest()

    def numpy(self, purpose: str, index: int) -> np.random.Generator:
        return np.random.default_rng(int.from_bytes(self._digest(purpose, index), "big"))

    def torch(self, purpose: str, index: int) -> torch.Generator:
        # torch's CPU generator takes a 64-bit seed; 2^64 candidate seeds per round are out of
        # brute-force reach, and no raw draw is ever published (only sums with the noise)
        seed = int.from_bytes(self._digest(purpose, index)[:8], "big") & (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    # -- persistence: only into the server's own checkpoint -----------------------------
    def save(self, directory: Path) -> Path:
        """Write the key to ``directory/privacy.key`` with mode 0600 (created that way and
        renamed into place, never readable by anyone else even for an instant)."""
        path = Path(directory) / KEY_FILE
        write_private(path, self._secret())
        return path

    @classmethod
    def load(cls, directory: Path) -> SecretStreams:
        """The checkpoint's key with a FRESH nonce: a resume is a new attempt at its rounds. The
        file is checked now and read on first use (:meth:`_secret`)."""
        path = Path(directory) / KEY_FILE
        if not path.is_file():
            raise UsageError(f"checkpoint {str(directory)!r} has no {KEY_FILE}: a DP run cannot be resumed "
                             "without its secret noise key (the run completed - the key is deleted then - or "
                             "the checkpoint was written by an older fedpeft)")
        if path.stat().st_size != KEY_BYTES:
            raise UsageError(f"{str(path)!r} is not a privacy key ({path.stat().st_size} bytes, expected {KEY_BYTES})")
        return cls(None, path=path)


def discard_key(directory: Path) -> bool:
    """Delete ``directory/privacy.key`` (unlink) once the run it belongs to has completed and
    published its final model: no resume is left to need it, and a key left on disk beside the
    released model is one secret fewer to protect (before each attempt drew its own nonce, the
    key alone regenerated every round's noise). Whether a key was there."""
    path = Path(directory) / KEY_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True

    def __repr__(self) -> str:  # never print the key
        return "SecretStreams(<secret>)"


class SeededStreams(RandomStreams):
    """Streams derived from the public run seed (non-private runs, or the insecure opt-in)."""

    kind = SEEDED_INSECURE

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def numpy(self, purpose: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SEEDED_TAGS[purpose], index])

    def torch(self, purpose: str, index: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.seed, _SEEDED_TAGS[purpose], index]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))


def client_secret_seeds(count: int, fallback: np.random.Generator | None = None) -> list[int]:
    """``count`` 63-bit seeds for a client's DP-SGD noise and Poisson batches.

    From the OS CSPRNG — a fresh secret per client round that never leaves the client — unless
    ``fallback`` (the client's public seeded stream, only under --insecure-reproducible-noise)
    is given.
    """
    if fallback is not None:
        return [int(s) for s in fallback.integers(2**63, size=count)]
    return [secrets.randbits(63) for _ in range(count)]


__all__ = ["COHORT", "KEY_FILE", "discard_key", "NONCE_BYTES", "RandomStreams", "SECRET", "SEEDED_INSECURE", "SEEDED_WARNING",
           "SERVER_NOISE", "SecretStreams", "SeededStreams", "client_secret_seeds"]
