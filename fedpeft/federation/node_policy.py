"""A SuperNode's own differential-privacy policy: what protects its examples is its setting,
not the server's (issue 24, finding 3).

Every train message carries the run config, and the server writes it. Read naively, that lets
a server switch a node to seeded noise, to z = 1e-6 or to no DP-SGD at all, pick the δ its ε
is computed at, and choose where on the node's disk its accountant lives (``<output>/...``).
In a real federation the node decides instead, from its node config
(``flower-supernode --node-config``; ``python -m fedpeft.deploy supernode --dp ...``):

========================================  ================================================
``dp``                                    ``none`` (default: the node trains as the run
                                          asks) or ``sample`` (only sample-level DP-SGD)
``dp-epsilon``                            ε budget of this node's accountant over ALL runs
``dp-noise-multiplier``                   smallest noise multiplier z it trains with
``dp-delta``                              largest δ it accepts (its ε is computed at the
                                          run's δ, at most this)
``dp-accountant``                         ``rdp`` (default) or ``prv``: how it accounts
``insecure-reproducible-noise``           ``true`` to allow seeded noise (default: refused)
``state-dir``                             where the accountant and per-run client state
                                          live (default ``$FLWR_HOME/fedpeft-state``,
                                          ``~/.flwr/fedpeft-state``)
========================================  ================================================

``dp = "sample"`` needs ``dp-epsilon`` or ``dp-noise-multiplier``. A train message asking for
less — another training mode, a smaller z, a larger δ or ε than the node's, seeded noise — is
refused: the ClientApp raises :class:`PolicyRefusal`, the node logs why, and the server gets
an error reply naming the reason (a failed client). Whatever the policy, the accountant is
``<state-dir>/accountants/<client id>.json`` and persists across runs (the budget check runs on
that lifetime history), and per-run client state (error-feedback residuals, FedSA-LoRA's ``B``)
goes to ``<state-dir>/runs/<digest of the run's output name>/``: the server's ``output`` path is
never a path on the node.

In simulation the node policy is the run's own config: the simulator is one owner of all its
processes, and its grids say so with ``dp-policy = "run"`` in each message's node config
(:mod:`fedpeft.federation.virtual_grid`). A deployed node that sets ``dp-policy = "run"`` itself
obeys the server, as before this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.errors import UsageError

#: node config key; ``"run"``: the run's config is the policy (the simulator's own grids)
POLICY_KEY = "dp-policy"
RUN_POLICY = "run"
LEVELS = ("none", "sample")
ACCOUNTANTS = ("rdp", "prv")
STATE_DIR_NAME = "fedpeft-state"


class PolicyRefusal(UsageError):
    """A train message asked for less privacy than the node's policy allows."""


def default_state_dir() -> Path:
    """``$FLWR_HOME/fedpeft-state`` (Flower's per-node home; default ``~/.flwr``)."""
    home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    return Path(home).expanduser() / STATE_DIR_NAME


def _float(node_config: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    raw = node_config.get(key, "")
    if raw in ("", None):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"node config {key}={raw!r} is not a number") from None
    if not (math.isfinite(value) and low < value < high):
        raise UsageError(f"node config {key}={raw!r} must be in ({low}, {high})")
    return value


def _bool(node_config: Mapping[str, Any], key: str) -> bool:
    raw = node_config.get(key, False)
    if isinstance(raw, bool):
        return raw
    if str(raw).lower() in ("true", "1", "yes"):
        return True
    if str(raw).lower() in ("false", "0", "no", ""):
        return False
    raise UsageError(f"node config {key}={raw!r} must be true or false")


@dataclass(frozen=True)
class NodePolicy:
    """The node's DP settings (see the module docstring); built by :meth:`of`."""

    level: str = "none"
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    accountant: str = "rdp"
    allow_insecure_noise: bool = False
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)

    @classmethod
    def of(cls, node_config: Mapping[str, Any]) -> NodePolicy | None:
        """The node's policy, or None when the run's config is the policy (simulation)."""
        if str(node_config.get(POLICY_KEY, "") or "") == RUN_POLICY:
            return None
        level = str(node_config.get("dp", "") or "none")
        if level not in LEVELS:
            raise UsageError(f"node config dp={level!r}: one of {', '.join(LEVELS)}")
        accountant = str(node_config.get("dp-accountant", "") or "rdp")
        if accountant not in ACCOUNTANTS:
            raise UsageError(f"node config dp-accountant={accountant!r}: one of {', '.join(ACCOUNTANTS)}")
        state = str(node_config.get("state-dir", "") or "")
        policy = cls(level=level, epsilon=_float(node_config, "dp-epsilon", 0.0, math.inf),
                     noise_multiplier=_float(node_config, "dp-noise-multiplier", 0.0, math.inf),
                     delta=_float(node_config, "dp-delta", 0.0, 1.0), accountant=accountant,
                     allow_insecure_noise=_bool(node_config, "insecure-reproducible-noise"),
                     state_dir=Path(state).expanduser() if state else default_state_dir())
        if level == "sample" and policy.epsilon is None and policy.noise_multiplier is None:
            raise UsageError("node config dp=sample needs dp-epsilon (a budget over all runs) or "
                             "dp-noise-multiplier (a floor on z), or both")
        return policy

    # -- where the node keeps state ---------------------------------------------------------
    @property
    def accountants(self) -> Path:
        """Sample-level accountants, one file per client id, kept across runs."""
        return self.state_dir / "accountants"

    def run_dir(self, cfg: RunConfig) -> Path:
        """Per-run client state: named by a digest of the run's output name (a resumed run
        finds its residuals again), never a path the server chose."""
        label = hashlib.sha256(str(cfg.output or "default").encode()).hexdigest()[:16]
        return self.state_dir / "runs" / label

    # -- checks -------------------------------------------------------------------------------
    def admit(self, cfg: RunConfig, dp_delta: float | None, training: str,
              client_id: int) -> tuple[RunConfig, float | None]:
        """``(cfg, δ)`` as this node trains it (its own accountant; the run's δ, else the
        node's), or :class:`PolicyRefusal` naming what the message asked for that the policy
        does not allow."""
        private = training == "sample"
        if self.level == "sample" and not private:
            self._refuse(client_id, f"the run asks for client training {training!r} (not "
                                    "--dp sample); this node trains only with sample-level "
                                    "DP-SGD (node config dp=sample)")
        if private and cfg.insecure_reproducible_noise and not self.allow_insecure_noise:
            self._refuse(client_id, "the run asks for insecure reproducible (seeded) noise; this "
                                    "node draws its DP-SGD noise from its own secret (node config "
                                    "insecure-reproducible-noise=true to allow)")
        if private and self.noise_multiplier is not None and cfg.noise_multiplier is not None \
                and cfg.noise_multiplier < self.noise_multiplier:
            self._refuse(client_id, f"the run asks for noise multiplier {cfg.noise_multiplier:g}, "
                                    f"below this node's floor dp-noise-multiplier="
                                    f"{self.noise_multiplier:g}")
        if private and self.epsilon is not None and cfg.epsilon is not None \
                and cfg.epsilon > self.epsilon:
            self._refuse(client_id, f"the run asks for epsilon {cfg.epsilon:g}, above this node's "
                                    f"budget dp-epsilon={self.epsilon:g}")
        # only DP-SGD reads δ (and a client is sent --delta only then)
        delta = dp_delta if dp_delta is not None else cfg.delta if private else None
        if private and self.delta is not None and delta is not None and float(delta) > self.delta:
            self._refuse(client_id, f"the run asks for delta {float(delta):g}, above this node's "
                                    f"dp-delta={self.delta:g}")
        if delta is None:
            delta = self.delta
        return cfg.with_changes(accountant=self.accountant), \
            (float(delta) if delta is not None else None)

    def check_noise(self, client_id: int | str, noise_multiplier: float) -> None:
        """After calibration: the z the run's settings give this client is not below the floor."""
        if self.noise_multiplier is not None and noise_multiplier < self.noise_multiplier:
            self._refuse(client_id, f"the run's settings give noise multiplier "
                                    f"{noise_multiplier:.4g} on this node, below its floor "
                                    f"dp-noise-multiplier={self.noise_multiplier:g}")

    def epsilon_limit(self, run_epsilon: float | None) -> tuple[float | None, str]:
        """The ε the node's lifetime accountant may reach, and its name for messages: the
        node's budget, else the run's target (without a budget of its own a node never goes
        past what one run asked for, summed over every run it trained in)."""
        if self.epsilon is not None:
            return self.epsilon, "this node's budget dp-epsilon"
        return run_epsilon, "--epsilon (the node sets no dp-epsilon of its own)"

    def _refuse(self, client_id: int | str, reason: str) -> None:
        from flwr.common import log

        text = f"node DP policy refuses this train message (client {client_id}): {reason}"
        log(WARNING, "fedpeft %s", text)
        raise PolicyRefusal(text)


__all__ = ["NodePolicy", "POLICY_KEY", "PolicyRefusal", "RUN_POLICY", "default_state_dir"]
