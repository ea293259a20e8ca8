"""How a sweep's rows name their attack setting, and the HS an attacker gets from a run: what the attack curve
(sweep/aggregate.py) and the worst case (sweep/worst_case.py) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftguard.sweep.config import RATIO_KEY, SweepConfig, attack_cells, axis_text


def hashable(value: Any) -> Any:
    """A section as an axis value ({name: jailbreak_tuning, args: {...}}) is grouped by as its folder text."""
    return axis_text(value) if isinstance(value, dict) else value


def attacker_hs(row: dict[str, Any]) -> float | None:
    """The HS the attacker gets: through the trigger the fine-tune taught, when it did and that is higher."""
    values = [v for v in (row["harmful_score"], row.get("harmful_score_triggered")) if v is not None]
    return max(values) if values else None


# the row columns of the harmful ratio, whichever axis (grid or attack) carries it
RATIO_COLUMNS = frozenset({f"grid.{RATIO_KEY}", f"attack.{RATIO_KEY}"})


def attack_setting(row: dict[str, Any], sweep: SweepConfig, skip: frozenset[str] = frozenset()) -> tuple:
    """The row's values of the attack grid's axes (outside ``skip``), as ((key, value), ...) in grid order."""
    assert sweep.attack is not None
    return tuple((key, row.get(f"attack.{key}")) for key in sweep.attack.grid if f"attack.{key}" not in skip)


def grid_position(sweep: SweepConfig) -> Callable[[tuple], tuple[int, ...]]:
    """Sort key of an attack setting ((axis, value) pairs, possibly without some axes): the place of the first
    attack setting it matches in ``attack_cells`` (the grid's combinations, then the listed settings), the order an
    attacker who tries the settings in turn reaches them. A value outside the declared settings (results of an
    older sweep file) goes after the declared ones."""
    assert sweep.attack is not None
    cells = [[(k, hashable(v)) for k, v in cell.items()] for cell in attack_cells(sweep.attack)]

    def position(setting: tuple) -> tuple[int, ...]:
        keys = {k for k, _ in setting}
        for index, cell in enumerate(cells):
            if tuple((k, v) for k, v in cell if k in keys) == tuple(setting):
                return (index,)
        return (len(cells),)

    return position
