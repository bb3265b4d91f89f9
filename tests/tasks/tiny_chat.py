"""A randomly initialised tiny Llama with a byte-level BPE tokenizer and a ChatML template,
built offline in about a second, plus a small prompt/response dataset with topics."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red"}


def pairs() -> list[dict[str, str]]:
    """Deterministic question -> answer rows over three topics (the answers follow from the
    questions, so a model can learn them)."""
    rows = []
    for a in range(6):
        for b in range(6):
            rows.append({"prompt": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
                         "response": f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.", "topic": "sums"})
    for thing, colour in COLOURS.items():
        for form in ("What colour is the {}?", "Tell me the colour of the {}.", "Which colour has the {}?"):
            rows.append({"prompt": form.format(thing), "response": f"The {thing} is {colour}.", "topic": "colours"})
    for n in range(12):
        rows.append({"prompt": f"Say the number {n}.", "response": f"{NUMBERS[n]}", "topic": "words"})
    return rows


def build_tiny_llama(root: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """``root/model``: config + random weights + tokenizer (with the chat template)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [f"{r['prompt']} {r['response']}" for r in pairs()] + ["user assistant system"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    out = root / "model"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


def write_dataset(root: Path) -> Path:
    """``root/chats.jsonl``: the rows of :func:`pairs`."""
    path = root / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs()), encoding="utf-8")
    return path
