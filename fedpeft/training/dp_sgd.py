"""Sample-level DP-SGD on one client (SPEC §3.2, as in FFA-LoRA §1.2).

Opacus does the privacy-critical parts: :class:`opacus.GradSampleModule` computes per-example
gradients of the trainable (adapter + head) parameters only — its hooks attach to modules
that own a parameter with ``requires_grad`` and nothing else, so the frozen backbone never
gets a ``grad_sample`` and never moves — and :class:`opacus.optimizers.DPOptimizer` clips
each example's gradient to L2 norm ``C``, adds ``N(0, z²C²)`` to the sum and divides by the
EXPECTED batch size. Batches are Poisson samples (each example independently with rate
``q``, :class:`opacus.utils.uniform_sampler.UniformWithReplacementSampler`), which is what the
sampled-Gaussian accountant assumes; an empty batch is still a noisy step (skipping it would
make the mechanism data-dependent).

Every noisy step is recorded by the Opacus optimizer hook straight into the client's
persistent :class:`fedpeft.privacy.Accountant` (``accountant.opacus_accountant``), never into a
fresh one: ε composes over all the rounds a client trains in.

Costs: the model is wrapped once per worker (:func:`grad_sample_module`, hooks switched on
only while a DP round runs, so the same cached model still serves non-private training and
evaluation); the DP optimizer is built per client round.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from fedpeft.adapters.base import StepHook
from fedpeft.data.tokenized import TokenizedSplit, collate
from fedpeft.privacy.accounting import Accountant
from fedpeft.training.local import LocalResult

#: A Poisson batch; ``None`` is an empty draw (a noise-only step).
Batch = dict[str, torch.Tensor] | None

# Attributes Opacus leaves on modules mid-step (activations of a forward whose backward
# never ran, e.g. after an exception); cleared after every round so the next one starts clean.
_MODULE_SCRATCH = ("activations", "max_batch_len")


# -- Poisson batches ----------------------------------------------------------------------
@dataclass(frozen=True)
class PoissonSchedule:
    """DP-SGD batch plan for a client with ``num_examples`` examples and expected batch
    ``batch_size``: rate ``q = min(1, B / n)`` and ``ceil(n / B)`` steps per local epoch
    (one "epoch" in expectation, the count the per-client calibration assumes)."""

    num_examples: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.num_examples < 1 or self.batch_size < 1:
            raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got "
                             f"{self.num_examples}, {self.batch_size}")

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.batch_size / self.num_examples)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def expected_batch_size(self) -> float:
        """``q · n``: the fixed denominator of the noisy mean (Opacus' ``expected_batch_size``)."""
        return self.sample_rate * self.num_examples


def poisson_batches(split: TokenizedSplit, rows: np.ndarray, sample_rate: float, steps: int,
                    generator: torch.Generator, pad_id: int,
                    collate_fn: Callable[..., dict] = collate) -> Iterator[Batch]:
    """``steps`` Poisson batches over ``rows`` (each row independently with ``sample_rate``),
    each made by ``collate_fn`` (the task's batches; padded classification rows by default)."""
    rows = np.asarray(rows)
    sampler = UniformWithReplacementSampler(num_samples=len(rows), sample_rate=sample_rate,
                                            generator=generator, steps=steps)
    for picked in sampler:
        yield collate_fn(split, rows[np.asarray(picked, dtype=np.int64)], pad_id) if picked else None


# -- the wrapped model -------------------------------------------------------------------
_wrapped: tuple[nn.Module, GradSampleModule] | None = None


def grad_sample_module(model: nn.Module) -> GradSampleModule:
    """The process' :class:`GradSampleModule` around ``model``, built once per model.

    A worker hosts one workspace model at a time (the workspace cache drops the previous
    one), so one slot is enough; wrapping a different model first removes every hook and
    attribute Opacus put on the old one. Hooks are left disabled: :func:`train_local_dp`
    switches them on for its round only.
    """
    global _wrapped
    if _wrapped is not None and _wrapped[0] is model:
        return _wrapped[1]
    if _wrapped is not None:
        _wrapped[1].cleanup()
        _wrapped = None
    # strict: refuse trainable modules with buffers (per-example gradients would be wrong)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm.disable_hooks()
    _wrapped = (model, gsm)
    return gsm


def release_grad_sample_module() -> None:
    """Unwrap the cached model (hooks and Opacus attributes removed); mainly for tests."""
    global _wrapped
    if _wrapped is not None:
        _wrapped[1].cleanup()
        _wrapped = None


def _clear_scratch(gsm: GradSampleModule, params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None
        p.grad_sample = None
        for attr in ("summed_grad", "_current_grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        if hasattr(p, "_forward_counter"):
            p._forward_counter = 0
    for m in gsm._module.modules():
        for attr in _MODULE_SCRATCH:
            # the instance's own dict: peft wrappers forward attribute reads to the wrapped module
            m.__dict__.pop(attr, None)


# -- one client's DP-SGD ------------------------------------------------------------------
def train_local_dp(model: nn.Module, epochs_batches: Iterable[Iterable[Batch]], *, lr: float,
                   noise_multiplier: float, sample_clip: float, sample_rate: float,
                   expected_batch_size: float, accountant: Accountant,
                   generator: torch.Generator | None = None,
                   before_step: StepHook | None = None) -> LocalResult:
    """DP-AdamW over the parameters that require grad (the same optimizer as the non-private
    :func:`fedpeft.training.local.train_local`; Adam only post-processes the noisy gradient).

    Every step — empty batches included — clips per-example gradients to ``sample_clip``,
    adds Gaussian noise with std ``noise_multiplier · sample_clip`` and records one
    ``(noise_multiplier, sample_rate)`` event in ``accountant`` (mutated in place; the caller
    persists it). ``generator`` drives the noise (reproducible simulation; Opacus'
    ``secure_mode`` is for deployments that need floating-point-attack resistance).
    Returns the mean loss over the examples seen and the number of noisy steps.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier {noise_multiplier} must be finite and > 0")
    if not (math.isfinite(sample_clip) and sample_clip > 0):
        raise ValueError(f"per-example clip {sample_clip} must be finite and > 0")
    gsm = grad_sample_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    opt = DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=sample_clip,
                      expected_batch_size=expected_batch_size, loss_reduction="mean",
                      generator=generator)
    opt.attach_step_hook(accountant.opacus_accountant.get_optimizer_hook_fn(sample_rate))
    total, steps, examples = 0.0, 0, 0
    gsm.enable_hooks()
    gsm.forbid_grad_accumulation()  # Poisson batches: exactly one backward per step
    gsm.train()
    try:
        for batches in epochs_batches:
            for batch in batches:
                after_step = before_step(steps) if before_step is not None else None
                if batch is None:  # empty Poisson draw: zero clipped sum, noise still added
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                else:
                    out = gsm(**batch)
                    with warnings.catch_warnings():
                        # lora_A's input (a frozen layer's output) needs no grad; Opacus only
                        # needs the grad w.r.t. the module output, which the hook still gets
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        out.loss.backward()
                    n = int(batch["labels"].shape[0])
                    total += float(out.loss.detach()) * n
                    examples += n
                opt.step()
                if after_step is not None:
                    after_step()
                opt.zero_grad(set_to_none=True)
                steps += 1
    finally:
        gsm.disable_hooks()
        gsm.allow_grad_accumulation()
        _clear_scratch(gsm, params)
        model.eval()
    return LocalResult(mean_loss=total / max(examples, 1), steps=steps, examples=examples)


__all__ = ["Batch", "PoissonSchedule", "grad_sample_module", "poisson_batches",
           "release_grad_sample_module", "train_local_dp"]
