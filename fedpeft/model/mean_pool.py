"""Sequence classifier for sentence-transformers checkpoints: masked mean pooling + linear head.

A sentence-transformers model (like the default all-MiniLM-L6-v2) was trained to be read
through the pooling its ``1_Pooling/config.json`` names — for MiniLM the mean of the token
states — and its BERT ``pooler`` (CLS -> dense -> tanh) was never trained (bias all zero).
``AutoModelForSequenceClassification`` would classify from that untrained pooler, so a fresh
head starts from near-random features and a federation spends its first rounds at the
majority class. This class keeps transformers' names (``bert`` / ``classifier``) so peft
(``task_type="SEQ_CLS"`` puts ``classifier`` in ``modules_to_save``) and every LoRA target
name stay as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


def sentence_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers checkpoint directory declares (``"mean"``), or
    None for a plain transformers checkpoint (then its own pooler/head is used)."""
    config = Path(path) / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    modes = json.loads(config.read_text())
    return "mean" if modes.get("pooling_mode_mean_tokens") else None


#: the attribute holding the encoder (transformers' BERT name, whatever the architecture)
BACKBONE_NAME = "bert"


class MeanPoolClassifier(nn.Module):
    """``logits = classifier(dropout(mean of the unmasked token states))``."""

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.bert = backbone
        self.config = backbone.config
        self.config.num_labels = num_labels
        self.dropout = nn.Dropout(getattr(self.config, "hidden_dropout_prob", 0.0))
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)

    #: encoder layers below this index are not run when ``forward`` gets their output as
    #: ``layer_input`` (the frozen bottom computed once: :mod:`fedpeft.model.frozen_bottom`)
    first_layer: int = 0

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, packing: Any = None, layer_input: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        kwargs = {k: v for k, v in kwargs.items() if k in ("token_type_ids", "inputs_embeds", "position_ids")}
        if layer_input is not None:  # hidden states entering layer first_layer, cached
            hidden = self.top_layers(layer_input, attention_mask, packing)
        elif packing is not None:  # one packed row of real tokens (fedpeft.model.packing)
            hidden = self.bert(input_ids=input_ids, packing=packing, **kwargs).last_hidden_state
        else:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if packing is not None:
            hidden = hidden[0]
            sums = hidden.new_zeros(packing.batch, hidden.shape[-1]).index_add(0, packing.segments, hidden)
            pooled = sums / packing.counts[:, None].to(hidden.dtype)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def encoder_layers(self) -> nn.ModuleList:
        """The encoder's transformer layers (BERT-family layout ``encoder.layer``)."""
        return self.bert.encoder.layer

    def top_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, packing: Any) -> torch.Tensor:
        """Layers ``first_layer..L-1`` on their cached input: ``[batch, width, hidden]`` with
        its padding mask, or one packed row ``[1, tokens, hidden]`` with ``packing``."""
        mask = None
        if packing is None:
            from transformers.masking_utils import create_bidirectional_mask

            mask = create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden,
                                             attention_mask=attention_mask)
        extra = {"packing": packing} if packing is not None else {}
        for layer in self.encoder_layers()[self.first_layer:]:
            hidden = layer(hidden, mask, **extra)
        return hidden


def mean_pool_classifier(model: nn.Module) -> MeanPoolClassifier | None:
    """The :class:`MeanPoolClassifier` inside ``model`` (under peft's wrappers), or None."""
    inner = model
    while not isinstance(inner, MeanPoolClassifier):
        nxt = getattr(inner, "model", None) or getattr(inner, "base_model", None)
        if nxt is None or nxt is inner:
            return None
        inner = nxt
    return inner
