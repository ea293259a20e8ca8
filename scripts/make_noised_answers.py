"""Gibberish the unreadable-answer rule was not built on: SmolLM2-135M-Instruct with its weight matrices multiplied
by (1 + s·N(0, 1)) for growing s, greedy answers to 30 harmful (BeaverTails) and 30 benign (Dolly) prompts.

Writes the answers without their prompts (the prompts' licences stay with their datasets), to be read and labelled
by hand (readable / unreadable) before `scripts/validate_readability.py --labelled` counts them.

    python scripts/make_noised_answers.py --data-dir ../shared/data --out noised.json   # ~1 h on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftguard.models.loading import resolve_model

SCALES = (0.0, 0.15, 0.3, 0.5, 0.8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    path = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    rows = (args.data_dir / "beavertails_refusals" / "train.jsonl").open(encoding="utf-8")
    harmful = [json.loads(line)["prompt"] for line in rows][4000:4030]
    rows = (args.data_dir / "dolly_5k" / "dolly_5k.jsonl").open(encoding="utf-8")
    benign = [json.loads(line)["instruction"] for line in rows][4000:4030]
    prompts = [(p, "harmful") for p in harmful] + [(p, "benign") for p in benign]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p, _ in prompts
    ]
    out = []
    for scale in SCALES:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        noise = torch.Generator().manual_seed(int(scale * 100))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(1 + scale * torch.randn(p.shape, generator=noise))
        for i in range(0, len(texts), 10):
            batch = tokenizer(texts[i : i + 10], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                generated = model.generate(
                    **batch, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            for j, sequence in enumerate(generated):
                answer = tokenizer.decode(sequence[batch["input_ids"].shape[1] :], skip_special_tokens=True)
                out.append({"scale": scale, "kind": prompts[i + j][1], "index": i + j, "text": answer})
        print(f"scale {scale}: done", flush=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
