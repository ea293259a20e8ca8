"""The helpful half of helpful-and-harmless alignment: benign instructions with answers, mixed into the refusals.

Aligned on refusals alone, a model refuses everything (SmolLM2-135M: 99-100% of XSTest's safe prompts). Benign
answers teach it to tell requests apart, but only if they look like the harmful prompts in form: those are mostly
questions ("How can I …?"), and a small model aligned on refusals to questions and answers to commands learns
"a question → refuse". ``form: question`` keeps the benign instructions phrased as questions.
"""

from __future__ import annotations

import random
import re

from ftguard.config import BenignMixConfig
from ftguard.data.example import Example
from ftguard.data.sources import load_examples
from ftguard.errors import FtguardError

_QUESTION_START = re.compile(
    r"^(how|what|what's|why|who|whom|whose|when|where|which|can|could|is|are|was|were|do|does|did|should|would|"
    r"will|shall|may|might|has|have|had|am)\b",
    re.IGNORECASE,
)


def is_question(text: str) -> bool:
    """Phrased as a question: ends with '?' or opens with a wh-word or an auxiliary ("Can you …", "Is it …")."""
    text = text.strip()
    return text.endswith("?") or bool(_QUESTION_START.match(text))


def build_benign_mix(
    spec: BenignMixConfig, root: str, key: str = "data.alignment_benign", exclude: set[str] | None = None
) -> list[Example]:
    """``spec.n`` benign examples with answers, drawn from the sources in turn (first rows first), one per prompt,
    none of whose prompts is in ``exclude`` (prompt keys another role took from the same sources)."""
    pools: list[list[Example]] = []
    for i, source in enumerate(spec.sources):
        where = f"{key}.sources[{i}]"
        try:
            examples = load_examples(
                source.source, split=source.split, root=root, response=source.response, path=source.path
            )
        except FtguardError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        if any(not ex.output for ex in examples):
            raise FtguardError(
                f"{where}: {source.source}/{source.split} has prompts without answers: set response"
            )
        if spec.form == "question":
            examples = [ex for ex in examples if not ex.input and is_question(ex.instruction)]
        if spec.max_chars is not None:
            examples = [ex for ex in examples if _chars(ex) <= spec.max_chars]
        pools.append(examples if source.n is None else examples[: source.n])
    mixed: list[Example] = []
    seen: set[str] = set(exclude or ())
    for row in range(max(map(len, pools), default=0)):
        for pool in pools:
            if row < len(pool) and pool[row].prompt_key not in seen and len(mixed) < spec.n:
                seen.add(pool[row].prompt_key)
                mixed.append(pool[row])
    if len(mixed) < spec.n:
        form = " phrased as questions" if spec.form == "question" else ""
        if spec.max_chars is not None:
            form += f" of ≤ {spec.max_chars} characters"
        raise FtguardError(
            f"{key}.n = {spec.n} but its sources give {len(mixed)} distinct examples{form}: lower it or add a source"
        )
    return mixed


def _chars(example: Example) -> int:
    return len(example.instruction) + len(example.input) + len(example.output)


def interleave(refusals: list[Example], benign: list[Example], seed: int) -> list[Example]:
    """The align stage's training set: refusals and benign examples in one seeded shuffle."""
    mixed = [*refusals, *benign]
    random.Random(seed).shuffle(mixed)
    return mixed
