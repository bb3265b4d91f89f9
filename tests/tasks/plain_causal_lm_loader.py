"""Load a fedpeft causal-LM export with torch + transformers + peft only, score it, generate.

Run as a script, never imported: ``python plain_causal_lm_loader.py <model dir> <examples.json>``
where the json is ``{"prompts": [...], "responses": [...], "generate": "<prompt>", "max_new_tokens": n}``.
Prints ``{"loss", "tokens", "completion", "fedpeft_imported"}``: the mean cross-entropy of the
answer tokens (each chat tokenised whole by the tokenizer's apply_chat_template, scored one
at a time, no padding), and a greedy completion computed token by token with argmax.
"""

import json
import sys

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, examples: str) -> dict:
    with open(examples, encoding="utf-8") as fh:
        data = json.load(fh)
    base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(model_dir).base_model_name_or_path)
    model = PeftModel.from_pretrained(base, model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    nll, count = 0.0, 0
    for prompt, response in zip(data["prompts"], data["responses"]):
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template([*user, {"role": "assistant", "content": response}], return_dict=False)
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits[len(head) - 1:-1], ids[0, len(head):], reduction="sum"))
        count += len(full) - len(head)
    ids = tok.apply_chat_template([{"role": "user", "content": data["generate"]}], add_generation_prompt=True,
                                  return_dict=False)
    new = []
    for _ in range(data["max_new_tokens"]):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    return {"loss": nll / count, "tokens": count,
            "completion": tok.decode(new, skip_special_tokens=True).strip(),
            "fedpeft_imported": any(m == "fedpeft" or m.startswith("fedpeft.") for m in sys.modules)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
