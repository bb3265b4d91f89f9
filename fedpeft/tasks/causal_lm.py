"""Instruction tuning of a causal LM (``--task causal-lm``): chat-formatted prompt/response
pairs, the loss on the answer tokens only, evaluated by held-out loss per answer token and
its perplexity.

The adapters (lora, ffa-lora, dylora, dp-dylora) inject into the LM's attention projections
(by default peft's targets for the model's type: ``q_proj,v_proj`` for Llama/Qwen/Mistral,
``c_attn`` for GPT-2); peft's ``CAUSAL_LM`` task type trains
the adapter alone (there is no head). Strategies, compression and user-level DP act on the
uploaded tensors and run unchanged; sample-level DP-SGD clips each example's gradient, whose
loss is that example's share of the batch's mean over answer tokens.

Not available (refused at settings validation with one line): the ``head`` adapter and
``--probe-rounds`` (no classification head), the frozen-bottom cache and packed batches (they are written for the
encoder classifier), FedSA-LoRA (its personalised evaluation is a classification accuracy),
``--text-column``/``--label-column`` (chat data has fixed ``prompt``/``response`` columns).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedpeft.tasks.base import AUTO_TARGETS, TASKS, Metric, Task, config_model_type

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.data.sources import LabeledSplits
    from fedpeft.export import Export
    from fedpeft.engine.workspace import Workspace
    from fedpeft.training.evaluate import EvalResult

#: held-out loss per answer token (the headline) and its perplexity: lower is better
EVAL_LOSS = Metric("eval_loss", "eval loss", "held-out loss per answer token", "eval_loss", "eval_loss",
                   higher_is_better=False)
PERPLEXITY = Metric("perplexity", "perplexity", "held-out perplexity", "eval_perplexity", "perplexity",
                    higher_is_better=False, spec=".3f")

#: chats per central-evaluation batch (a 49k-token vocabulary makes logits the big tensor)
EVAL_BATCH = 8


@TASKS.register("causal-lm")
class CausalLM(Task):
    name = "causal-lm"
    client_settings = ("model", "dataset", "max_length", "test_fraction", "max_test_examples")
    peft_task_type = "CAUSAL_LM"
    metrics = (EVAL_LOSS, PERPLEXITY)
    #: measured (README): SmolLM2 at --epsilon 8 with R = 87 went from perplexity 16.5 to 57.1
    swamped = ("expect the held-out loss to rise, as SmolLM2's did at --epsilon 8 with R = 87: perplexity 16.5 -> "
               "57.1; lower d (--rank 1, --adapter ffa-lora, --lora-layers with --no-bottom-cache) or raise --cohort; "
               "the planner does not choose settings for --task causal-lm")
    #: the embedded SmolLM2 on the chatterbot corpus, LoRA on peft's default targets for the
    #: model's type (q_proj,v_proj for Llama, c_attn for GPT-2), and a run small enough for a
    #: CPU: one client visit of 8 chats costs 2 steps of a 135M-parameter model (7-25 s each on
    #: the loaded 2-core build machine)
    defaults = {"model": "embedded:SmolLM2-135M-Instruct", "dataset": "chatterbot",
                "target_modules": AUTO_TARGETS, "max_length": 128, "clients": 20, "cohort": 5, "rounds": 2,
                "batch_size": 4, "max_client_examples": 8, "max_test_examples": 64}

    def model_type(self, model: str) -> str:
        """An embedded model's declared type (no conversion), else its config's."""
        from fedpeft.model.causal_lm import EMBEDDED_CAUSAL_LMS, resolve_causal_lm

        if model in EMBEDDED_CAUSAL_LMS:
            return EMBEDDED_CAUSAL_LMS[model].model_type
        return config_model_type(model, resolve_causal_lm(model))

    def refusal(self, cfg: RunConfig) -> str | None:
        from fedpeft.config import RunConfig
        from fedpeft.strategy import STRATEGIES

        allowed_adapters = "lora, ffa-lora, dylora, dp-dylora"
        if cfg.adapter == "head":
            return (f"--adapter head trains a classification head, which --task causal-lm does not have; "
                    f"allowed: {allowed_adapters}")
        if cfg.probe_rounds:
            return (f"--probe-rounds {cfg.probe_rounds} trains a classification head before the adapter, which "
                    "--task causal-lm does not have; allowed: --probe-rounds 0")
        if cfg.lora_layers and cfg.bottom_cache:
            return (f"--train-top-k/--lora-layers {cfg.lora_layers} compute the frozen bottom once, which is not "
                    "implemented for --task causal-lm; allowed: --no-bottom-cache (LoRA on those layers, the whole "
                    "model run every visit)")
        if getattr(STRATEGIES.get(cfg.strategy), "client_local", False):
            return (f"--strategy {cfg.strategy} reports a personalised classification accuracy, not implemented "
                    "for --task causal-lm; allowed: fedavg, lora-fair, flora")
        default = RunConfig()
        for name in ("text_column", "label_column"):
            if getattr(cfg, name) != getattr(default, name):
                flag = "--" + name.replace("_", "-")
                return (f"{flag} {getattr(cfg, name)!r} applies to --task classification; --task causal-lm reads "
                        "the prompt and response columns (and topic, if present)")
        return None

    def load_splits(self, cfg: RunConfig) -> LabeledSplits:
        from fedpeft.data.chat import load_chat_splits

        return load_chat_splits(cfg.dataset, cfg.test_fraction, cfg.max_test_examples)

    def tokenize(self, cfg: RunConfig, splits: LabeledSplits) -> tuple[Any, Any, int]:
        from fedpeft.data.chat import tokenize_chats
        from fedpeft.model.causal_lm import load_chat_tokenizer

        tokenizer = load_chat_tokenizer(cfg.model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return (tokenize_chats(splits.train, tokenizer, cfg.max_length),
                tokenize_chats(splits.test, tokenizer, cfg.max_length), int(pad or 0))

    def base_model(self, cfg: RunConfig, splits: LabeledSplits) -> nn.Module:
        from fedpeft.model.causal_lm import load_causal_lm

        return load_causal_lm(cfg.model)

    def collate(self, split: Any, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:  # noqa: ANN401
        from fedpeft.data.chat import collate_chats

        return collate_chats(split, rows, pad_id)

    def evaluate(self, model: nn.Module, split: Any, pad_id: int,  # noqa: ANN401
                 shard: tuple[int, int] = (0, 1)) -> EvalResult:
        from fedpeft.data.chat import chat_eval_batches
        from fedpeft.training.evaluate import evaluate_tokens

        return evaluate_tokens(model, chat_eval_batches(split, EVAL_BATCH, pad_id, shard))

    def build_export(self, ws: Workspace, global_state: dict[str, torch.Tensor], cfg: RunConfig) -> Export:
        from fedpeft.causal_lm_export import build_causal_export

        return build_causal_export(ws, global_state, cfg)

    def round_metrics(self, ev: EvalResult | None) -> dict[str, float | None]:
        """Loss per answer token and its perplexity; no accuracy (a next-token hit rate is not
        what the task is judged by, so it is not published)."""
        if ev is None:
            return {"eval_loss": None, "eval_accuracy": None, "eval_perplexity": None}
        return {"eval_loss": ev.loss, "eval_accuracy": None,
                "eval_perplexity": math.exp(ev.loss) if ev.loss < 700 else math.inf}
