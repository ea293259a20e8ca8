"""The one record type every data source produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """An instruction-following sample (Alpaca fields).

    ``output`` is the training target (a refusal, a harmful answer, a task label...); for prompt-only
    evaluation sets it may be empty. ``source`` says where the row came from (``"sst2/train#17"``) so
    that counts and overlaps can be reported.
    """

    instruction: str
    output: str = ""
    input: str = ""
    source: str = ""
    # A multi-turn chat row (a customer's upload): every (role, content) turn, ending with the assistant turn whose
    # text is ``output``; ``instruction`` is the last user turn. Empty for a single instruction → answer row.
    messages: tuple[tuple[str, str], ...] = ()

    @property
    def prompt_key(self) -> str:
        """Normalised prompt text used to check that data roles are disjoint."""
        return " ".join(f"{self.instruction}\n{self.input}".lower().split())
