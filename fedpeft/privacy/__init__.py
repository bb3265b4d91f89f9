"""Differential privacy for fedpeft (SPEC §3): accountants (Opacus RDP/PRV), calibration of
the noise multiplier, the clip-and-noise mechanism of user-level DP-FedAvg and adaptive
clipping — pure functions over tensors; the server stage lives in ``fedpeft.stages.user_dp``."""

from fedpeft.privacy.accounting import ACCOUNTANTS, Accountant, make_accountant, rdp_orders
from fedpeft.privacy.adaptive_clipping import (
    AdaptiveClipConfig,
    next_clip,
    noised_quantile,
    update_noise_multiplier,
)
from fedpeft.privacy.calibration import (
    check_budget,
    default_delta,
    noise_multiplier_for,
    would_exceed_budget,
)
from fedpeft.privacy.mechanisms import clip_by_l2, dp_fedavg_aggregate, gaussian_noise_like, l2_norm

__all__ = [
    "ACCOUNTANTS", "Accountant", "AdaptiveClipConfig", "check_budget", "clip_by_l2",
    "default_delta", "dp_fedavg_aggregate", "gaussian_noise_like", "l2_norm", "make_accountant",
    "next_clip", "noise_multiplier_for", "noised_quantile", "update_noise_multiplier",
    "would_exceed_budget",
]


def __getattr__(name: str) -> object:
    """``RDP_ORDERS`` (:func:`rdp_orders`), computed when first read: it needs Opacus."""
    if name == "RDP_ORDERS":
        return rdp_orders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
