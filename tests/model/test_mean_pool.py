"""The embedded sentence-transformers model is read the way it was trained: masked mean
pooling of the token states (its ``1_Pooling`` config), not the untrained CLS pooler."""

from __future__ import annotations

import pytest
import torch

from fedpeft.settings import resolve
from fedpeft.errors import UsageError
from fedpeft.model.loading import load_classifier, load_tokenizer, resolve_model_path
from fedpeft.model.mean_pool import MeanPoolClassifier, sentence_pooling

MODEL = "embedded:all-MiniLM-L6-v2"


def test_auto_pooling_follows_the_checkpoint_config():
    assert sentence_pooling(resolve_model_path(MODEL)) == "mean"
    assert isinstance(load_classifier(MODEL, 2, seed=0), MeanPoolClassifier)
    cls = load_classifier(MODEL, 2, seed=0, pooling="cls")
    assert type(cls).__name__ == "BertForSequenceClassification"


def test_logits_are_the_head_applied_to_the_masked_token_mean():
    model = load_classifier(MODEL, 3, seed=0)
    tok = load_tokenizer(MODEL)
    batch = tok(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # independent: sentence-transformers' mean pooling, sentence by sentence without padding
        for i, text in enumerate(["a gripping, funny film", "dull"]):
            single = tok([text], return_tensors="pt")
            states = model.bert(**single).last_hidden_state[0]
            mean = states.mean(0)
            expected = mean @ model.classifier.weight.T + model.classifier.bias
            torch.testing.assert_close(logits[i], expected, atol=1e-5, rtol=1e-5)


def test_pooling_is_validated():
    with pytest.raises(UsageError, match="--pooling 'max' is invalid; allowed: auto, mean, cls"):
        resolve({"pooling": "max"})
