"""``$FTGUARD_PRECISION``: what every ``auto`` precision setting resolves to, read without the training stack so
that the command line can check it before any work."""

from __future__ import annotations

import os

from ftguard.errors import FtguardError

PRECISION_ENV = "FTGUARD_PRECISION"
PRECISION_CHOICES = ("auto", "fp32", "bf16")


def forced_precision() -> str:
    """``$FTGUARD_PRECISION``: ``auto`` (unset: the hardware decides), ``fp32`` or ``bf16``.

    It decides what every ``auto`` precision setting resolves to, so that one run (or the test suite) gives the
    same numbers on a CPU with native bf16 and on one without. Explicit settings (``no``, ``bf16``) win over it.
    """
    value = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if value not in PRECISION_CHOICES:
        raise FtguardError(
            f"{PRECISION_ENV}={value!r} is not a precision: use {', '.join(PRECISION_CHOICES)}"
        )
    return value
