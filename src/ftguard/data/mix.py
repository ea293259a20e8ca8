"""The harmful fine-tuning mix (p·n harmful + (1−p)·n benign) and disjoint data roles."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal
from itertools import combinations

from ftguard.data.example import Example
from ftguard.errors import FtguardError


def harmful_count(n: int, p: float) -> int:
    """round-half-up(p·n): n=5, p=0.5 gives 3 (Python's round() would give 2)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FtguardError(f"data.finetune.n must be an integer >= 1, got {n!r}")
    if isinstance(p, bool) or not isinstance(p, int | float) or math.isnan(p) or not 0 <= p <= 1:
        raise FtguardError(f"data.finetune.harmful_ratio must be a number in [0, 1], got {p!r}")
    # Decimal(repr(p)) keeps p as typed: 0.15 * 10 is exactly 1.5 (binary floats give 1.4999999999999998).
    return int((Decimal(repr(float(p))) * n).to_integral_value(rounding=ROUND_HALF_UP))


@dataclass
class MixReport:
    n: int
    harmful_ratio: float
    n_harmful: int
    n_benign: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def build_harmful_mix(
    benign: list[Example], harmful: list[Example], *, n: int, p: float, seed: int
) -> tuple[list[Example], MixReport]:
    """The first harmful_count(n, p) harmful and the first n − that benign examples, shuffled by ``seed``.

    Callers pass already-chosen pools (e.g. the attack slice of :func:`take_disjoint`), so taking the
    first rows keeps the papers' "first p·n rows" rule.
    """
    n_harmful = harmful_count(n, p)
    n_benign = n - n_harmful
    for kind, pool, need in (("harmful", harmful, n_harmful), ("benign", benign, n_benign)):
        if len(pool) < need:
            raise FtguardError(
                f"the {kind} pool has {len(pool)} examples but n={n}, harmful_ratio={p} needs {need}: lower "
                "data.finetune.n or data.finetune.harmful_ratio, or use a data root with more data"
            )
    mix = list(harmful[:n_harmful]) + list(benign[:n_benign])
    # The papers leave the mix ordered and let the Trainer's sampler shuffle; a seeded shuffle here keeps
    # harmful rows from clustering at the start of any sampler that does not shuffle.
    random.Random(seed).shuffle(mix)
    return mix, MixReport(n=n, harmful_ratio=p, n_harmful=n_harmful, n_benign=n_benign, seed=seed)


def take_disjoint(
    pool: list[Example], counts: dict[str, int], *, seed: int | None = None
) -> dict[str, list[Example]]:
    """Split one pool into disjoint role slices, in ``counts`` order.

    Duplicated prompts are dropped first (first occurrence kept), so no prompt can land in two roles.
    ``seed=None`` keeps file order (the papers' "first rows"); a seed shuffles the deduplicated pool first.
    """
    for role, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise FtguardError(f"data role {role!r} needs a non-negative integer count, got {count!r}")
    seen: set[str] = set()
    unique = []
    for ex in pool:
        if ex.prompt_key not in seen:
            seen.add(ex.prompt_key)
            unique.append(ex)
    if seed is not None:
        random.Random(seed).shuffle(unique)
    need = sum(counts.values())
    if need > len(unique):
        wanted = ", ".join(f"{role}={count}" for role, count in counts.items())
        raise FtguardError(
            f"the pool has {len(unique)} distinct prompts ({len(pool) - len(unique)} duplicates dropped) but the "
            f"roles need {need} ({wanted}): lower those counts or use a data root with more data"
        )
    out, start = {}, 0
    for role, count in counts.items():
        out[role] = unique[start : start + count]
        start += count
    return out


def check_disjoint(roles: dict[str, list[Example]]) -> None:
    """Raise if two roles share a prompt (e.g. an alignment refusal and an attack prompt).

    Roles that hold the same prompts by design (refusal and harmful answer of one record) must not be
    passed together.
    """
    keys: dict[str, dict[str, Example]] = {}
    for role, examples in roles.items():
        keys[role] = {}
        for ex in examples:
            keys[role].setdefault(ex.prompt_key, ex)
    for a, b in combinations(roles, 2):
        shared = [k for k in keys[a] if k in keys[b]]
        if shared:
            text = keys[a][shared[0]].instruction
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise FtguardError(
                f"data roles {a!r} and {b!r} share {len(shared)} prompt(s), e.g. {shown!r}: remove the shared "
                "prompts from one of the two sets, or give them disjoint slices of one pool (take_disjoint) or "
                "different sources"
            )
