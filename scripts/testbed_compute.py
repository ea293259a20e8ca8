"""The testbed's compute: run time spent per sweep and an estimate of what is left, from the archive.

    python scripts/testbed_compute.py [docs/results] [--sweeps testbed-study cpu-attack-suite ...]

Spent is the sum of the archived runs' wall times (results.json ``wall_time_s``: one thread each; two lanes run
at once, so the machine's wall time is about half). Left is, per run not archived yet, the mean wall time of the
same defense's archived runs in that sweep, else of that defense's runs in the other testbed sweeps (the study,
the strong attack and the attack suite name their defenses alike), else of every archived SmolLM2 run; a sweep
on another model with no run yet is "unknown". A crude estimate: a run that reuses units (an aligned model, an
upload) costs less than this says, one that trains its own alignment more (the alignment calibration's Vaccine
and Booster rows take 1–1.5 h each, against a mean of about 25 minutes). The runs a sweep will make come from its packaged file (the expansion `ftguard sweep` runs).
A run that another sweep's archive holds under the same config costs nothing: the lanes copy it
(`ftguard sweep --reuse`), and a copy's time is counted in the sweep that made it, not again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SWEEPS = (
    "hh-align-search",
    "hh-align-search-2",
    "hh-align-search-3",
    "hh-align-search-4",
    "testbed-attack-calibration",
    "testbed-defense-calibration",
    "cpu-attack-suite-virus-probe",
    "testbed-align-calibration",
    "testbed-gemma3-defenses",
    "testbed-study",
    "testbed-study-strong",
    "testbed-study-uncalibrated",
    "cpu-attack-suite",
)


def archived(folder: Path) -> dict[str, float | None]:
    """{run id (defense/run folder): wall time in seconds} of the complete runs archived in ``folder``; None for
    a run copied from another sweep (``ftguard sweep --reuse``), whose time that sweep counts."""
    out: dict[str, float | None] = {}
    for path in sorted(folder.glob("runs/*/*/results.json")):
        results = json.loads(path.read_text())
        run_id = f"{path.parts[-3]}/{path.parts[-2]}"
        if results.get("complete") and results.get("reused_from"):
            out[run_id] = None
        elif results.get("complete") and results.get("wall_time_s") is not None:
            out[run_id] = float(results["wall_time_s"])
    return out


def _walls(done: dict[str, float | None]) -> dict[str, float]:
    return {k: w for k, w in done.items() if w is not None}


def reusable(runs: list, others: list[Path]) -> set[str]:
    """Ids of ``runs`` that another sweep's archive has finished under the same config: `ftguard sweep --reuse`
    (scripts/testbed_lanes.sh passes the lanes' archives) copies them instead of making them."""
    from ftguard.sweep.reuse import sources

    return set(sources(runs, [o for o in others if (o / "runs").is_dir()]))


def planned(name: str, archive: Path) -> list:
    """The runs ``ftguard sweep`` makes for sweep ``name``: the packaged file, else the one archived with it."""
    from ftguard.errors import FtguardError
    from ftguard.sweep.config import expand, load_sweep

    try:
        sweep, folder = load_sweep(f"sweeps/{name}")
    except FtguardError:
        if not (archive / "sweep.yaml").is_file():
            raise SystemExit(
                f"{name}: neither a packaged sweep nor archived with its sweep.yaml in {archive}"
            ) from None
        sweep, folder = load_sweep(str(archive / "sweep.yaml"))
    return expand(sweep, folder, Path("/nonexistent"))


# Searches closed with runs left unrun (docs/testbed.md, step 1: grid 3 stopped and replaced by grid 4).
CLOSED = ("hh-align-search", "hh-align-search-3")
# Sweeps on another model: the SmolLM2 runs say nothing of their cost (a Gemma-3-270M step costs about 5× one).
OTHER_MODEL = ("testbed-gemma3-defenses",)
# scripts/testbed_lanes.sh runs two sweeps at once, one thread each, on the 2-core machine.
LANES = 2


def _by_defense(done: dict[str, float | None]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for run_id, wall in _walls(done).items():
        out.setdefault(run_id.split("/", 1)[0], []).append(wall)
    return out


def estimate(
    done: dict[str, float | None], runs: list[str], elsewhere: dict[str, list[float]], fallback: float
) -> float:
    """Seconds left for ``runs`` not in ``done``: per defense, its mean here, else elsewhere, else the mean of
    this sweep's runs, else ``fallback``."""
    here = _by_defense(done)
    walls = list(_walls(done).values())
    sweep_mean = [statistics.fmean(walls)] if walls else [fallback]
    return sum(
        statistics.fmean(here.get(d) or elsewhere.get(d) or sweep_mean)
        for d in (run_id.split("/", 1)[0] for run_id in runs if run_id not in done)
    )


def table(root: Path, names: tuple[str, ...] = SWEEPS) -> list[str]:
    return _rows(root, names)[0]


def _rows(root: Path, names: tuple[str, ...]) -> tuple[list[str], float, float, list[str]]:
    """The table's lines, the single-thread hours spent and left, and the sweeps whose cost is unknown."""
    done = {name: archived(root / name) for name in names}
    smollm = [w for name in names if name not in OTHER_MODEL for w in _walls(done[name]).values()]
    fallback = statistics.fmean(smollm) if smollm else 0.0
    lines = [
        "| sweep | runs archived | run time spent (h) | to copy from another sweep | estimated left (h) |",
        "|---|---|---|---|---|",
    ]
    total_spent = total_left = 0.0
    unknown = []
    for name in names:
        runs = planned(name, root / name)
        ids = [run.id for run in runs]
        spent = sum(_walls(done[name]).values()) / 3600
        total_spent += spent
        kept = sum(run_id in done[name] for run_id in ids)
        todo = [run for run in runs if run.id not in done[name]]
        copies = reusable(todo, [root / n for n in names if n != name])
        head = f"| {name} | {kept} of {len(ids)} | {spent:.1f} | {len(copies)} |"
        if name in CLOSED:
            lines.append(f"{head} closed |")
            continue
        if name in OTHER_MODEL and not done[name]:
            unknown.append(name)
            lines.append(f"{head} unknown (no run of this model yet) |")
            continue
        others = {k: w for n in names if n != name and n not in OTHER_MODEL for k, w in done[n].items()}
        elsewhere = {} if name in OTHER_MODEL else _by_defense(others)
        left = estimate(done[name], [i for i in ids if i not in copies], elsewhere, fallback) / 3600
        total_left += left
        lines.append(f"{head} {left:.1f} |")
    rest = f" + {', '.join(unknown)}" if unknown else ""
    lines.append(f"| all | | {total_spent:.1f} | | {total_left:.1f}{rest} |")
    return lines, total_spent, total_left, unknown


def machine_hours(spent: float, left: float, unknown: list[str], lanes: int = LANES) -> str:
    """The totals as hours of the machine, whose lanes each run one single-thread sweep at once (the issue's
    budget is in those hours: 24 h of the 2-core machine)."""
    rest = f" + {', '.join(unknown)}" if unknown else ""
    return (
        f"On the machine ({lanes} lanes at once): spent {spent / lanes:.1f} h, left {left / lanes:.1f} h{rest}, "
        f"together {(spent + left) / lanes:.1f} h{rest}."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", nargs="?", type=Path, default=Path("docs/results"))
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS))
    args = parser.parse_args(argv)
    lines, spent, left, unknown = _rows(args.root, tuple(args.sweeps))
    print("\n".join([*lines, "", machine_hours(spent, left, unknown)]))


if __name__ == "__main__":
    main()
