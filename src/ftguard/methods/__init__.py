"""Built-in methods. Adding one: write ``methods/<name>.py`` and add its module name below."""

from __future__ import annotations

import importlib

BUILTIN_METHOD_MODULES = (
    "sft",
    "vaccine",
    "tvaccine",
    "booster",
    "repnoise",
    "filter",
    "lisa",
    "ewc",
    "vlguard",
    "ldifs",
    "kl",
    "antidote",
    "safelora",
    "recovery",
    "one_shot_safety",
    "safemerge",
    "asft",
    "smart",
    "panacea",
)


def load_builtin_methods() -> None:
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(f"ftguard.methods.{module}")
