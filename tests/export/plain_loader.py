"""Load an exported fedpeft model with torch + transformers + peft only, and score it.

Run as a script (never imported by fedpeft): ``python plain_loader.py <model dir> <examples.json>``
where the json is ``{"texts": [...], "labels": [...]}``; prints ``{"accuracy", "correct",
"examples", "logits", "fedpeft_imported"}`` as JSON (logits in the json's order). It mirrors the README's loading snippet.
"""

import json
import sys

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

HEADS = {"mean": AutoModelForTokenClassification, "cls": AutoModelForSequenceClassification}


def main(model_dir: str, examples: str) -> None:
    data = json.loads(open(examples, encoding="utf-8").read())
    config = AutoConfig.from_pretrained(model_dir)
    base = HEADS[config.classifier_pooling].from_pretrained(
        PeftConfig.from_pretrained(model_dir).base_model_name_or_path, config=config)
    model = PeftModel.from_pretrained(base, model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    correct, rows = 0, []
    for start in range(0, len(data["texts"]), 32):
        enc = tok(data["texts"][start:start + 32], truncation=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        if config.classifier_pooling == "mean":
            mask = enc["attention_mask"].unsqueeze(-1).to(logits.dtype)
            logits = (logits * mask).sum(1) / mask.sum(1)
        rows += logits.tolist()
        labels = torch.tensor(data["labels"][start:start + 32])
        correct += int((logits.argmax(-1) == labels).sum())
    n = len(data["labels"])
    print(json.dumps({"accuracy": correct / n, "correct": correct, "examples": n, "logits": rows,
                      "fedpeft_imported": any(m == "fedpeft" or m.startswith(("fedpeft.", "strategies"))
                                              for m in sys.modules)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
