"""Built-in attacks (the uploader's side; docs/attacks.md). Adding one: write ``attacks/<name>.py`` and add its
module name below."""

from __future__ import annotations

import importlib

BUILTIN_ATTACK_MODULES = ("harmful_mix", "identity_shift", "jailbreak_tuning", "benign_outliers", "virus")


def load_builtin_attacks() -> None:
    for module in BUILTIN_ATTACK_MODULES:
        importlib.import_module(f"ftguard.attacks.{module}")
