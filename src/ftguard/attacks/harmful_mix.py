"""The papers' attack: round(p·n) harmful (prompt → harmful answer) rows in place of task rows.

Huang et al.'s Vaccine, Lisa and Booster, and Qi et al. (ICLR 2024)'s harmful examples demonstration attack at
p = 1: the first round(p·n) harmful rows of the attack pool and the first n − round(p·n) benign rows (the
general instructions, then the task), shuffled by the run's seed (docs/methods.md, User data).
"""

from __future__ import annotations

from ftguard.attacks.base import Attack, Upload, UploadPools, register_attack
from ftguard.data.mix import build_harmful_mix


@register_attack
class HarmfulMix(Attack):
    name = "harmful_mix"
    paper = "Huang et al., Vaccine (NeurIPS 2024) / Booster (ICLR 2025): the p-harmful upload"
    summary = "round(p·n) harmful answers in place of task rows, shuffled by the seed (the default)"

    def build(self, pools: UploadPools, p: float, seed: int) -> Upload:
        examples, report = build_harmful_mix(pools.benign, pools.harmful, n=pools.n, p=p, seed=seed)
        return Upload(examples, {**report.as_dict(), "attack": self.describe()})
