"""The frozen bottom computed once: run only the trained top layers in every client visit.

When the adapter changes only encoder layers ``s..L-1`` (``--train-top-k k`` or
``--lora-layers`` naming the top layers) the embeddings and layers ``0..s-1`` are frozen, so the
hidden states entering layer ``s`` are the same for an example in every round and every
client visit. Computing them once per example (on this machine's disk cache, shared by every
worker) and running only layers ``s..L-1``, pooling and head per visit cuts a visit's
forward to ``k/L`` of the encoder — and the backward never went below layer ``s`` anyway.
This is what lets DP runs afford the large cohorts and many rounds that keep the noise
(SPEC §3.5) small while still changing the encoder (issue #23).

Exactness: in eval mode the cached path gives the full model's logits and gradients up to
float rounding; the workspace checks that on the model it built (:func:`matches_full_model`)
and keeps the full forward if it does not hold. In train mode the only difference is the
frozen layers' dropout, which a cached (frozen, eval-mode) bottom does not apply — as for the
head-only feature cache.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from fedpeft.data.tokenized import TokenizedSplit, collate
from fedpeft.model.mean_pool import mean_pool_classifier
from fedpeft.model.packing import outputs_match

_LAYER = re.compile(r"\.encoder\.layer\.(\d+)\.")


class _Stop(Exception):
    """Raised by the capture hook: nothing above the cached layer needs to run."""


def first_trained_layer(model: nn.Module) -> int:
    """Index ``s`` of the lowest encoder layer the adapter touches (a trainable tensor or a
    LoRA factor/base weight, which FFA-LoRA freezes and FLoRA folds into), or 0 when anything
    below the encoder's layers is trained or the model is not fedpeft's mean-pooling
    classifier on a BERT-style ``encoder.layer`` list (then nothing is cached)."""
    inner = mean_pool_classifier(model)
    if inner is None or not isinstance(getattr(getattr(inner.bert, "encoder", None), "layer", None), nn.ModuleList):
        return 0
    first = len(inner.encoder_layers())
    for name, param in model.named_parameters():
        touched = param.requires_grad or ".lora_" in name
        if not touched:
            continue
        match = _LAYER.search(name)
        if match is not None:
            first = min(first, int(match.group(1)))
        elif "classifier" not in name:
            return 0  # embeddings or another tensor outside the layers is trained
    return first


@torch.inference_mode()
def layer_inputs(model: nn.Module, split: TokenizedSplit, first: int, pad_id: int,
                 batch_size: int = 64) -> dict[str, np.ndarray]:
    """The hidden states entering encoder layer ``first`` for every example of ``split`` (eval
    mode), packed: ``states`` (tokens, hidden) float32 in row order, ``offsets`` (n + 1)."""
    inner = mean_pool_classifier(model)
    assert inner is not None
    lengths = split.lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    states = np.empty((int(offsets[-1]), inner.config.hidden_size), dtype=np.float32)
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    was_training = model.training
    model.eval()
    handle = inner.encoder_layers()[first].register_forward_pre_hook(grab)
    order = np.argsort(lengths, kind="stable")  # length-sorted batches pad least
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = collate(split, rows, pad_id)
            try:
                inner.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            except _Stop:
                pass
            hidden = captured.pop().to(torch.float32).numpy()
            for j, row in enumerate(rows):
                states[offsets[row]:offsets[row + 1]] = hidden[j, : lengths[row]]
    finally:
        handle.remove()
        model.train(was_training)
    return {"states": states, "offsets": offsets}


def use_cached_bottom(model: nn.Module, first: int) -> None:
    """Make ``model`` read ``layer_input`` as the input of layer ``first`` (0: full forward)."""
    inner = mean_pool_classifier(model)
    if inner is not None:
        inner.first_layer = first


def matches_full_model(model: nn.Module, tokens: TokenizedSplit, hidden, rows: np.ndarray,  # noqa: ANN001
                       pad_id: int, tolerance: float = 1e-5) -> bool:
    """Whether the cached path (``hidden``'s padded batch of ``rows``) gives the full
    forward's logits and trainable gradients (eval mode) within ``tolerance``, relative to
    the largest magnitude."""
    return outputs_match(model, (lambda: collate(tokens, rows, pad_id), lambda: hidden.collate(rows, pad_id)),
                         tolerance, need_grads=True)


__all__ = ["first_trained_layer", "layer_inputs", "matches_full_model",
           "use_cached_bottom"]
