"""Padding-free training batches: the dense layers see only real tokens.

Why: a client's shuffled batch of 8 review snippets is padded to its longest row; on the
embedded data (mean 27 tokens, max 64) 39% of the tokens a padded batch pushes through every
linear layer are padding (1.63 padded tokens per real one), and the linear layers are where
the time goes (issue #15's profile: ``mm``/``addmm`` 57% of a training step). Here a batch is
one packed row of its sequences back to back (``position_ids`` restart at 0 per sequence), so
embeddings, Q/K/V/output projections, feed-forward layers, layer norms and hidden dropout
run on the real tokens only. Only attention needs the sequences apart: the registered
attention function (:data:`ATTENTION`) scatters Q/K/V into the usual padded
``[batch, heads, width, head_dim]`` layout, runs ``scaled_dot_product_attention`` with the
key-padding mask, and gathers the real rows back — the same attention (and the same
attention-dropout shape) as the padded batch. Mean pooling sums each sequence's tokens.

The result equals the padded forward up to float rounding for any encoder whose tokens
interact only through attention and whose positions come from ``position_ids``; the
workspace checks that on the model it built (:func:`enable_packing` compares logits and
gradients against :func:`fedpeft.data.tokenized.collate`'s padded batch) and keeps padded batches when it does not hold, or when
the classifier is not fedpeft's mean-pooling one (a CLS head reads position 0 of the row).
DP-SGD never packs: Opacus's per-sample gradients need one row per example.

Dropout draws its masks over tensors of a different shape than in a padded batch, so a
packed run's numbers are not bit-identical to a padded run's (same distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: name of the attention implementation registered with transformers
ATTENTION = "fedpeft_packed"
#: the implementation packing wraps (the default transformers loads for BERT-style encoders)
_FALLBACK = "sdpa"


@dataclass(frozen=True)
class Packing:
    """Where the packed row's tokens sit in the padded ``[batch, width]`` layout."""

    #: for each packed token, its flat position ``row * width + column`` in the padded layout
    index: torch.Tensor
    #: for each packed token, its sequence (row) in the batch
    segments: torch.Tensor
    #: tokens per sequence (float, for the mean)
    counts: torch.Tensor
    #: ``[batch, 1, 1, width]``, True where a key is a real token
    key_mask: torch.Tensor
    batch: int
    width: int


def packing_of(lengths: np.ndarray) -> tuple[Packing, np.ndarray]:
    """The :class:`Packing` of sequences of ``lengths`` put back to back, and each packed
    token's position in its own sequence."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max())
    segments = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    columns = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    key_mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])[:, None, None, :]
    packing = Packing(index=torch.from_numpy(segments * width + columns), segments=torch.from_numpy(segments),
                      counts=torch.from_numpy(lengths).to(torch.float32), key_mask=key_mask,
                      batch=len(lengths), width=width)
    return packing, columns


def pack(seqs: Sequence[np.ndarray], labels: np.ndarray) -> dict[str, object]:
    """One packed batch of ``seqs`` (token id arrays) with ``labels``."""
    packing, columns = packing_of(np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs)))
    return {"input_ids": torch.from_numpy(np.concatenate(seqs).astype(np.int64))[None, :],
            "position_ids": torch.from_numpy(columns)[None, :],
            "packing": packing, "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64))}


def collate_packed(split, rows: np.ndarray, pad_id: int = 0) -> dict[str, object]:  # noqa: ANN001, ARG001
    """:func:`fedpeft.data.tokenized.collate`'s signature, packed (``pad_id`` unused: no padding).
    A split of cached layer inputs (:class:`fedpeft.data.hidden_states.HiddenSplit`) packs itself."""
    own = getattr(split, "collate_packed", None)
    if own is not None:
        return own(rows)
    return pack([split.input_ids[i] for i in rows], split.labels[rows])


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     packing: Packing | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``[1, heads, tokens, head_dim]`` packed inputs when
    ``packing`` is given (the model forward passes it down), else the wrapped implementation."""
    if packing is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[_FALLBACK](module, query, key, value, attention_mask, dropout=dropout,
                                                  scaling=scaling, **kwargs)
    heads, head_dim = query.shape[1], query.shape[3]
    rows = packing.batch * packing.width

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [B, H, W, D]
        flat = x[0].transpose(0, 1)  # [T, H, D]
        out = flat.new_zeros(rows, heads, head_dim).index_copy(0, packing.index, flat)
        return out.view(packing.batch, packing.width, heads, head_dim).transpose(1, 2)

    out = nn.functional.scaled_dot_product_attention(
        padded(query), padded(key), padded(value), attn_mask=packing.key_mask, dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(rows, heads, head_dim).index_select(0, packing.index)
    return out.unsqueeze(0), None  # [1, T, H, D], as the interface returns


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    # unpacked batches (evaluation, DP-SGD) need the wrapped implementation's padding mask
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[_FALLBACK])


def _encoder_config(model: nn.Module):  # noqa: ANN202 - a transformers config
    from fedpeft.model.mean_pool import mean_pool_classifier

    inner = mean_pool_classifier(model)
    return None if inner is None else inner.bert.config


def enable_packing(model: nn.Module, split, rows: np.ndarray, pad_id: int,  # noqa: ANN001
                   tolerance: float = 1e-4) -> bool:
    """Switch ``model`` to packed training if it is fedpeft's mean-pooling classifier on an
    encoder using the ``sdpa`` attention and the packed batch of ``split``'s ``rows`` gives
    the padded batch's logits and trainable gradients (eval mode: no dropout) within
    ``tolerance``; else leave it as it was. Returns whether packing is on."""
    config = _encoder_config(model)
    if config is None or getattr(config, "_attn_implementation", None) not in (_FALLBACK, ATTENTION):
        return False
    _register()
    config._attn_implementation = ATTENTION  # unpacked batches still run the wrapped sdpa
    ok = _same_as_padded(model, split, rows, pad_id, tolerance)
    if not ok:
        config._attn_implementation = _FALLBACK
    return ok


def _same_as_padded(model: nn.Module, split, rows: np.ndarray, pad_id: int, tolerance: float) -> bool:  # noqa: ANN001
    from fedpeft.data.tokenized import collate

    return outputs_match(model, (lambda: collate(split, rows, pad_id), lambda: collate_packed(split, rows, pad_id)),
                         tolerance)


def outputs_match(model: nn.Module, batches: Sequence[Callable[[], dict]], tolerance: float,
                  need_grads: bool = False) -> bool:
    """Whether two ways of feeding the same rows (``batches``: two batch makers) give the same
    logits and trainable gradients in eval mode, within ``tolerance`` relative to the largest
    magnitude; False when the model cannot take one of them. ``need_grads``: also False when
    no trainable tensor got a gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        results = []
        for make in batches:
            out = model(**make())
            grads = torch.autograd.grad(out.loss, params, allow_unused=True)
            results.append((out.logits.detach(), [g for g in grads if g is not None]))
    except (TypeError, ValueError, RuntimeError, AttributeError):  # the model does not take these inputs
        return False
    finally:
        model.train(was_training)
    (a, ga), (b, gb) = results

    def close(x: torch.Tensor, z: torch.Tensor) -> bool:
        return bool((x - z).abs().max() <= tolerance * max(1.0, float(x.abs().max())))

    return (close(a, b) and len(ga) == len(gb) and (len(ga) > 0 or not need_grads)
            and all(close(x, z) for x, z in zip(ga, gb)))
