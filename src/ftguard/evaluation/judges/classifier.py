"""What the sequence-classifier judges (``beaver-dam``, ``duoguard``) share: one text per (prompt, response)
pair, a classifier head over harm categories, sigmoid probabilities, flagged when the largest is > threshold.

Batches are sorted longest first and right-padded: the classifiers pool the last non-pad token, so batching
gives the one-at-a-time result (the tests check it for both judges).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from tqdm.auto import tqdm

from ftguard.evaluation.judges.base import Judge, Verdict, resolve_device_dtype


class SigmoidClassifierJudge(Judge):
    """Harmful when some category has sigmoid probability > ``threshold``; registered nowhere itself.

    A subclass sets the class attributes below and writes ``_load`` (``tokenizer`` with right padding, and
    ``model``, a sequence classifier) and ``format_input`` (the one text the model scores for a pair); it may
    name the categories (``_labels``, default the config's ``id2label``). The options ``model``, ``threshold``
    and ``max_length`` default to ``default_model``, ``default_threshold`` and ``default_max_length``.
    """

    default_model: str
    default_threshold: float
    default_max_length: int

    def __init__(
        self,
        model: str | None = None,
        threshold: float | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool | None = None,
    ) -> None:
        self.model_id = self.default_model if model is None else model
        self.threshold = self.default_threshold if threshold is None else threshold
        self.max_length = self.default_max_length if max_length is None else max_length
        self.batch_size = batch_size
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self._load({} if trust_remote_code is None else {"trust_remote_code": trust_remote_code})
        self.model.to(self.device).eval()
        self.labels = self._labels()

    @abstractmethod
    def _load(self, extra: dict[str, Any]) -> None:
        """Set ``self.tokenizer`` and ``self.model`` (on the CPU, in ``self.dtype``); ``extra`` goes to both."""

    def _labels(self) -> list[str]:
        """The category names, in the order of the classifier's outputs."""
        return [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @abstractmethod
    def format_input(self, prompt: str, response: str) -> str:
        """The text the classifier scores for one (prompt, response) pair."""

    def encode(self, prompts: list[str], responses: list[str]):
        texts = [self.format_input(p, r) for p, r in zip(prompts, responses, strict=True)]
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    @torch.inference_mode()
    def probabilities(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """[N, len(labels)] per-category sigmoid probabilities."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]) - len(responses[i]))
        out = torch.empty(len(prompts), len(self.labels))
        progress = len(prompts) > self.batch_size
        for start in tqdm(range(0, len(order), self.batch_size), desc=self.name, disable=not progress):
            batch = order[start : start + self.batch_size]
            encoded = self.encode([prompts[i] for i in batch], [responses[i] for i in batch]).to(self.device)
            logits = self.model(
                input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
            ).logits
            out[batch] = torch.sigmoid(logits.float()).cpu()
        return out

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        top, index = self.probabilities(prompts, responses).max(dim=-1)
        return [
            Verdict(harmful=p > self.threshold, score=p, category=self.labels[i])
            for p, i in zip(top.tolist(), index.tolist(), strict=True)
        ]
