"""The classification head on cached features (``--adapter head``, :mod:`fedpeft.data.features`).

Holds the very ``classifier`` module of the full model (same parameter names, same seeded
initial values) and the model's head dropout; ``forward(features)`` equals the full model's
logits in eval mode, because the features are exactly the classifier's eval-mode input. In
train mode the only difference is the encoder's internal dropout, which a frozen, cached
encoder does not apply (the head's own dropout still does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class FeatureClassifier(nn.Module):
    def __init__(self, classifier: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.classifier = classifier
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        logits = self.classifier(self.dropout(features))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def head_dropout(model: nn.Module) -> float:
    """The dropout probability in front of the model's classifier (0 when it has none)."""
    drop = getattr(model, "dropout", None)
    return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
