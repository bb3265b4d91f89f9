"""The pfl-research side of ``bench_pfl_peer.py``: one federated run of fedpeft's job with pfl.

Runs in its OWN virtual environment (``pfl==0.6.0``, torch 2.13.0 CPU, transformers, peft;
see ``bench_pfl_peer.py --setup-venv``) and imports nothing from fedpeft: everything it needs
comes from the job file that ``bench_pfl_peer.py`` exported from fedpeft's workspace — model
directory, train texts and labels, every client's train rows (fedpeft's partitions), the
per-round cohorts (fedpeft's Poisson draws), the test split and fedpeft's initial trainable
tensors (LoRA A/B + head), so both frameworks train the same clients on the same rows from
the same starting point and are evaluated on the same examples.

pfl pieces used (pfl 0.6.0, PyTorch backend):

* ``pfl.model.pytorch.PyTorchModel`` around the peft LoRA model; local optimizer AdamW
  (weight decay 0, a fresh one per client visit, as fedpeft), central optimizer SGD with
  lr 1 (``w += mean update``: FedAvg);
* ``pfl.algorithm.FederatedAveraging`` with ``NNAlgorithmParams`` / ``NNTrainHyperParams``
  (1 local epoch, batch 8). Its per-client before/after local evaluation (on by default
  in evaluation rounds) is switched off: fedpeft does not do that work;
* ``pfl.data.FederatedDataset`` with a user sampler that returns the exported cohort of the
  round, and a ``HyperParam`` cohort size equal to that round's count (pfl samples fixed-size
  cohorts; the Poisson count comes from fedpeft's draw);
* ``pfl.aggregate.SimulatedBackend`` with ``WeightByDatapoints`` (example-weighted FedAvg,
  as fedpeft's FedAvg), or under user-level DP ``WeightByUser`` +
  ``CentrallyAppliedPrivacyMechanism(GaussianMechanism.from_privacy_accountant(
  RDPPrivacyAccountant(...), clipping_bound))`` — clip each client's update, noise the sum;
* a ``CentralEvaluationCallback`` subclass that evaluates after every round (fedpeft's
  schedule) instead of before training + after rounds 2.. (pfl's default).

Launch: ``python pfl_peer_worker.py JOB.json OUT.json`` (one process) or under
``torchrun --standalone --nproc_per_node 2`` (pfl's multi-worker simulation, gloo).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

T0 = time.perf_counter()

import numpy as np
import torch
from torch import nn


def log(msg: str) -> None:
    print(f"[pfl-worker {os.environ.get('RANK', '0')}] {time.perf_counter() - T0:7.1f}s {msg}", flush=True)


class MeanPoolClassifier(nn.Module):
    """fedpeft's ``MeanPoolClassifier`` (logits = classifier(dropout(masked mean of token
    states))), rebuilt here so this venv needs no fedpeft; same attribute names, so peft
    produces the same parameter names."""

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.bert = backbone
        self.config = backbone.config
        self.config.num_labels = num_labels
        self.dropout = nn.Dropout(getattr(self.config, "hidden_dropout_prob", 0.0))
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class PflClassifier(nn.Module):
    """The module pfl's ``PyTorchModel`` wants: ``loss(*batch)`` and ``metrics(*batch)``.

    Batches are fixed-width rows (``max_length``) trimmed to their longest row before the
    forward pass, which is what fedpeft's collate (pad to the batch's longest row) computes.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @staticmethod
    def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(mask.sum(1).max())
        return ids[:, :width].long(), mask[:, :width].long()

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.train()
        ids, mask = self._trim(ids, mask)
        return self.net(input_ids=ids, attention_mask=mask, labels=labels.long()).loss

    @torch.inference_mode()
    def metrics(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict:
        from pfl.metrics import Weighted

        self.eval()
        ids, mask = self._trim(ids, mask)
        labels = labels.long()
        logits = self.net(input_ids=ids, attention_mask=mask).logits
        n = int(labels.shape[0])
        loss = float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct = int((logits.argmax(-1) == labels).sum())
        return {"loss": Weighted(loss, n), "accuracy": Weighted(correct, n)}


def encode(tokenizer, texts: list[str], max_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (truncated like fedpeft, no padding from the tokenizer) in a fixed-width
    array plus the attention mask."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ids = np.full((len(enc), max_length), pad_id, dtype=np.int64)
    mask = np.zeros((len(enc), max_length), dtype=np.int64)
    for i, row in enumerate(enc):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    threads = int(job.get("torch_threads", 1))
    torch.set_num_threads(threads)
    np.random.seed(job["seed"])  # pfl derives its cohort/noise seeds from numpy's global RNG
    torch.manual_seed(job["seed"])

    # pfl picks its framework from what is imported; the model module registers PyTorch ops
    from peft import LoraConfig, get_peft_model
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints, WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.common_types import Population
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.hyperparam.base import HyperParam
    from pfl.internal.ops.selector import get_default_framework_module as get_ops
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import (
        CentrallyAppliedPrivacyMechanism,
        GaussianMechanism,
        RDPPrivacyAccountant,
    )
    from transformers import AutoModel, AutoTokenizer
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    rank = get_ops().distributed.global_rank
    world = get_ops().distributed.world_size
    log(f"imports done; world size {world}, {threads} torch thread(s)")

    # -- data: tokenise with the same tokenizer and truncation as fedpeft ----------------
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_ids, train_mask = encode(tokenizer, job["train_texts"], job["max_length"], pad_id)
    train_labels = np.asarray(job["train_labels"], dtype=np.int64)
    test_ids, test_mask = encode(tokenizer, job["test_texts"], job["max_length"], pad_id)
    test_labels = np.asarray(job["test_labels"], dtype=np.int64)
    # fedpeft evaluates length-sorted batches of 64 (padding, not order, matters)
    order = np.argsort(test_mask.sum(1), kind="stable")
    test = Dataset(raw_data=[test_ids[order], test_mask[order], test_labels[order]])
    client_rows = [np.asarray(r, dtype=np.int64) for r in job["client_rows"]]
    cohorts: list[list[int]] = job["cohorts"]
    log(f"tokenised {len(train_labels)} train / {len(test_labels)} test rows")

    # -- model: MiniLM + masked mean pooling + peft LoRA, fedpeft's initial tensors --------
    torch.manual_seed(job["seed"])
    backbone = AutoModel.from_pretrained(job["model_path"], add_pooling_layer=False)
    net = MeanPoolClassifier(backbone, job["num_labels"])
    net.requires_grad_(False)
    lora = LoraConfig(task_type="SEQ_CLS", r=job["rank"], lora_alpha=job["alpha"], lora_dropout=0.0,
                      target_modules=job["target_modules"], bias="none")
    net = get_peft_model(net, lora)
    initial = torch.load(job["initial_state_path"])
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    if set(trainable) != set(initial):
        raise SystemExit(f"trainable tensors differ from fedpeft's: {sorted(set(trainable) ^ set(initial))[:6]}")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(initial[name])
    module = PflClassifier(net)
    params = [p for p in module.parameters() if p.requires_grad]
    model = PyTorchModel(
        model=module,
        local_optimizer_create=lambda ps, lr: torch.optim.AdamW([p for p in ps if p.requires_grad], lr=lr,
                                                                weight_decay=0.0),
        central_optimizer=torch.optim.SGD(params, lr=1.0))
    log(f"model ready: {sum(p.numel() for p in params)} trainable parameters")

    # -- cohorts: fedpeft's Poisson draw of each round, as pfl cohorts ---------------------
    class RoundState(HyperParam, TrainingProcessCallback):
        """The current round (pfl iteration + 1); also the round's cohort size."""

        def __init__(self) -> None:
            self.iteration = 0
            self.position = 0

        def value(self) -> int:
            return len(cohorts[min(self.iteration, len(cohorts) - 1)])

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.iteration = central_iteration + 1
            self.position = 0
            return False, Metrics()

    state = RoundState()

    def user_sampler() -> int:
        # pfl's multi-worker sampler draws world_size users per step and keeps its own: with
        # an odd cohort a worker can ask one past the end (that draw is never trained)
        cohort = cohorts[state.iteration]
        uid = cohort[min(state.position, len(cohort) - 1)]
        state.position += 1
        return uid

    def make_user(uid: int) -> Dataset:
        # fedpeft's per-(seed, round, client) stream: a torch seed, then the row order
        rng = np.random.default_rng([job["seed"], state.iteration + 1, uid])
        torch.manual_seed(int(rng.integers(2**31)))
        rows = rng.permutation(client_rows[uid])
        return Dataset(raw_data=[train_ids[rows], train_mask[rows], train_labels[rows]], user_id=uid)

    federated = FederatedDataset(make_user, user_sampler)

    class FedAvgNoLocalEval(FederatedAveraging):
        """pfl's FederatedAveraging without the per-client local evaluation before and after
        training that it runs in evaluation rounds (fedpeft does not do that work)."""

        def simulate_one_user(self, model, user_dataset, central_context):
            if central_context.population == Population.TRAIN:
                central_context = dataclasses.replace(central_context, do_evaluation=False)
            return super().simulate_one_user(model, user_dataset, central_context)

    evals: list[dict] = []
    round_t: list[float] = []

    class EveryRoundEvaluation(CentralEvaluationCallback):
        """Central evaluation after every round, none before training (fedpeft's schedule)."""

        def on_train_begin(self, *, model):
            self._t = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            train_s = time.perf_counter() - self._t
            stop, metrics = self._eval(model)
            values = {k.lower(): float(v) for k, v in metrics.to_simple_dict().items()}
            acc = next(v for k, v in values.items() if k.endswith("| accuracy"))
            loss = next(v for k, v in values.items() if k.endswith("| loss"))
            now = time.perf_counter()
            evals.append({"round": central_iteration + 1, "accuracy": acc, "loss": loss,
                          "clients": len(cohorts[central_iteration]), "train_s": train_s,
                          "round_s": now - self._t, "t": now - T0})
            round_t.append(now - self._t)
            log(f"round {central_iteration + 1}: accuracy {acc:.4f} ({now - self._t:.1f} s)")
            self._t = now
            return stop, metrics

    if job["dp"]:
        accountant = RDPPrivacyAccountant(num_compositions=job["rounds"], sampling_probability=job["sample_rate"],
                                          mechanism="gaussian", epsilon=job["epsilon"], delta=job["delta"])
        mechanism = CentrallyAppliedPrivacyMechanism(
            GaussianMechanism.from_privacy_accountant(accountant=accountant, clipping_bound=job["clip"]))
        postprocessors = [WeightByUser(), mechanism]
        privacy = {"accountant": "rdp (pfl RDPPrivacyAccountant, dp-accounting)",
                   "noise_multiplier": float(accountant.cohort_noise_parameter), "clip": job["clip"],
                   "epsilon": job["epsilon"], "delta": job["delta"], "sample_rate": job["sample_rate"],
                   "num_compositions": job["rounds"]}
        log(f"DP: z = {accountant.cohort_noise_parameter:.4f}")
    else:
        postprocessors = [WeightByDatapoints()]
        privacy = None
    backend = SimulatedBackend(training_data=federated, val_data=federated, postprocessors=postprocessors)
    algorithm_params = NNAlgorithmParams(central_num_iterations=job["rounds"], evaluation_frequency=1,
                                         train_cohort_size=state, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=job["local_epochs"], local_learning_rate=job["lr"],
                                      local_batch_size=job["batch_size"])
    eval_params = NNEvalHyperParams(local_batch_size=job["eval_batch_size"])
    callbacks = [state, EveryRoundEvaluation(test, model_eval_params=eval_params)]
    t_train = time.perf_counter()
    log("training")
    FedAvgNoLocalEval().run(algorithm_params=algorithm_params, backend=backend, model=model,
                            model_train_params=train_params, model_eval_params=eval_params,
                            callbacks=callbacks, send_metrics_to_platform=False)
    if rank == 0:
        result = {"evals": evals, "final_accuracy": evals[-1]["accuracy"] if evals else None,
                  "setup_s": t_train - T0, "train_s": time.perf_counter() - t_train,
                  "total_s": time.perf_counter() - T0, "world_size": world, "torch_threads": threads,
                  "privacy": privacy, "versions": _versions()}
        Path(out_path).write_text(json.dumps(result, indent=2))
    log("done")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("pfl", "torch", "transformers", "peft", "dp_accounting", "numpy"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
