"""Run under ``torchrun --nproc_per_node 2``: ``generate_sharded`` on a tiny Llama, against one process's ``generate``.

Every rank records the prompts its model decoded (a spy on ``model.generate``); rank 0 also runs plain
``generate`` on all the prompts, in this process, and writes a JSON report to ``argv[1]``.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from ftguard.distributed import shutdown
from ftguard.evaluation.generate import generate, generate_sharded
from tiny import WORDS, peaked_llama, word_tokenizer

BATCH = 3


def prompts() -> list[str]:
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 9, (11,), generator=g).tolist()
    return [
        " ".join(WORDS[j % len(WORDS)] for j in torch.randint(0, 99, (n,), generator=g).tolist())
        for n in lengths
    ]


def main() -> None:
    dist.init_process_group("gloo")
    tokenizer = word_tokenizer()
    model = peaked_llama(len(tokenizer))
    decoded: list[str] = []
    real_generate = model.generate

    def spy(*args, **kwargs):
        decoded.extend(tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True))
        return real_generate(*args, **kwargs)

    model.generate = spy
    texts = generate_sharded(
        model,
        tokenizer,
        prompts(),
        max_new_tokens=6,
        batch_size=BATCH,
        token_counts=(counts := []),
        progress=False,
    )
    model.generate = real_generate
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, {"decoded": decoded, "texts": texts, "counts": counts})
    if dist.get_rank() == 0:
        reference_counts: list[int] = []
        reference = generate(
            model,
            tokenizer,
            prompts(),
            max_new_tokens=6,
            batch_size=BATCH,
            token_counts=reference_counts,
            progress=False,
        )
        report = {
            "prompts": prompts(),
            "ranks": everything,
            "reference": reference,
            "reference_counts": reference_counts,
        }
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
