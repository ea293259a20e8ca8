"""What a failed multi-process launch said, without the warnings that bury it."""

from __future__ import annotations

_NOISE = ("Warning:", "warnings.warn(", "find_unused_parameters", "consider turning this flag off")


def launch_failure(stderr: str, limit: int = 3000) -> str:
    """The tracebacks of a failed `torch.distributed.run` (every rank's, from the first on), else its stderr
    without DDP's per-step warnings: their tail alone once hid why a launch failed."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if "Traceback" in line), None)
    kept = lines[start:] if start is not None else [ln for ln in lines if not any(n in ln for n in _NOISE)]
    # A rank killed by a C++ exception (gloo's timeouts) prints no Python traceback, only these, before the
    # launcher's own traceback
    aborts = [
        ln
        for ln in (lines[:start] if start is not None else [])
        if any(m in ln for m in ("terminate called", "what()", "gloo"))
    ]
    # The aborts go last, and the text is cut from its front: a log that keeps only its tail (CI's summary) then
    # still shows why a rank died, not only the launcher's list of exit codes.
    text = "\n".join([*kept, *aborts])
    return ("…\n" if len(text) > limit else "") + text[-limit:]
