"""An on-disk cache of MiniLM embeddings for judge fitting: each text is embedded once across refits.

Keys are SHA-1 digests of (view settings, text); the tensors live in safetensors shards beside a JSON index.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftguard.evaluation.judges.heads import (
    ANSWER_TOKENS,
    OPENING_TOKENS,
    PROMPT_TOKENS,
    PairFeatures,
    rule_matrix,
)  # noqa: E501

CHUNK = 2048  # texts per shard: an interrupted run keeps every finished shard


def _key(kind: str, text: str) -> str:
    settings = f"{kind}|{ANSWER_TOKENS}|{OPENING_TOKENS}|{PROMPT_TOKENS}|"
    return hashlib.sha1((settings + text).encode("utf-8")).hexdigest()


class EmbeddingCache:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.vectors: dict[str, torch.Tensor] = {}
        for shard in sorted(folder.glob("shard-*.safetensors")):
            keys = json.loads(shard.with_suffix(".json").read_text())
            tensors = load_file(str(shard))["vectors"]
            self.vectors.update(zip(keys, tensors, strict=True))

    def _store(self, keys: list[str], vectors: torch.Tensor) -> None:
        index = len(list(self.folder.glob("shard-*.safetensors")))
        path = self.folder / f"shard-{index:05d}.safetensors"
        path.with_suffix(".json").write_text(json.dumps(keys))
        save_file({"vectors": vectors.contiguous()}, str(path))
        self.vectors.update(zip(keys, vectors, strict=True))

    def _fill(self, embedder, kind: str, texts: list[str]) -> None:
        missing = sorted({t for t in texts if _key(kind, t) not in self.vectors})
        for start in range(0, len(missing), CHUNK):
            chunk = missing[start : start + CHUNK]
            if kind == "answer":
                whole, opening = embedder.embed_views(
                    chunk, opening_tokens=OPENING_TOKENS, max_length=ANSWER_TOKENS, progress=True
                )
                vectors = torch.cat([whole, opening], dim=1)
            else:
                vectors = embedder.embed_views(chunk, max_length=PROMPT_TOKENS, progress=True)[0]
            self._store([_key(kind, t) for t in chunk], vectors)
            print(f"{kind}: {min(start + CHUNK, len(missing))}/{len(missing)} new texts embedded", flush=True)

    def features(self, embedder, prompts: list[str], responses: list[str]) -> PairFeatures:
        self._fill(embedder, "answer", responses)
        self._fill(embedder, "prompt", prompts)
        answers = torch.stack([self.vectors[_key("answer", r)] for r in responses])
        prompt = torch.stack([self.vectors[_key("prompt", p)] for p in prompts])
        return PairFeatures(prompt, answers[:, :384], answers[:, 384:], rule_matrix(responses))
