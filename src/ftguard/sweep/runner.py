"""Run every run of a sweep, sharing units, skipping what is done, and write the aggregate report.

Layout of ``<output_dir>``:
- ``sweep.yaml``: the sweep as given; ``sweep.json``: the index of runs with their status (rewritten as runs end);
- ``units/<align|finetune|post|eval>/<fingerprint>/``: trained models and evaluations, shared by every run
  that needs them (an aligned model is trained once for all ratios, tasks and fine-tuning defenses on top);
  ``--units-dir`` puts them elsewhere, e.g. in another sweep's store to reuse its units;
- ``runs/<defense>/<axes>-seed<N>/``: each run's config.yaml and results.json;
- ``report.md``, ``report.json``, ``runs.csv``, ``runs.json`` and the figures of sweep/plots.py.

A run whose results.json is complete for its config is skipped, so an interrupted sweep resumes where it
stopped; an interrupted unit resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ftguard.config import RunConfig
from ftguard.errors import FtguardError
from ftguard.pipeline.outputs import (
    UnitBusy,
    file_lock,
    read_json,
    wait_for_unit,
    write_json_atomic,
    write_text_atomic,
)
from ftguard.schema import ConfigError, from_dict, to_dict
from ftguard.sweep.config import SweepConfig, SweepRun, expand
from ftguard.sweep.reuse import judged_alike

log = logging.getLogger(__name__)


def sweep_dir(sweep: SweepConfig, output_dir: str | None = None) -> Path:
    return Path(output_dir or sweep.output_dir or f"runs/sweeps/{sweep.name}")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → (i, n): this process takes runs i, i+n, i+2n, ... (0-based)."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise FtguardError(f"--shard '{text}' must look like i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise FtguardError(f"--shard '{text}': need 0 ≤ i < n")
    return i, n


def is_done(run: SweepRun) -> bool:
    path = run.config.out_dir / "results.json"
    if not path.is_file():
        return False
    results = read_json(path)
    if not results.get("complete"):
        return False
    # judged otherwise: the run is redone, and its trained units are reused, so only the evaluation is paid again
    if not judged_alike(run.config, results):
        return False
    if results.get("config_hash") == run.config.fingerprint():
        return True
    # The hash covers output_dir and every field: a sweep moved to another folder (or restored from an archive of
    # its results, possibly written before a config field with a neutral default was added) compares the configs
    # themselves, read through today's schema, less where they were written.
    try:
        then = from_dict(RunConfig, results.get("config") or {})
    except (ConfigError, TypeError, ValueError):
        return False  # a field was removed or changed meaning since: the run is redone
    return _where_free(then.to_dict()) == _where_free(run.config.to_dict())


def _where_free(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "output_dir"}, sort_keys=True, default=str)


def preflight(runs: list[SweepRun]) -> None:
    """Build every distinct data plan (and the methods' own data) before any training: a missing file or
    impossible ratio in the last run of a grid must not surface hours into the sweep."""
    from ftguard.pipeline.units import build_graph

    seen: set[str] = set()
    for run in runs:
        key = run.config.fingerprint("data", "evaluate", "align", "finetune", "post")
        if key in seen:
            continue
        seen.add(key)
        try:
            build_graph(run.resolved)
        except FtguardError as exc:
            raise FtguardError(f"sweep run {run.id}: {exc}") from None


def run_sweep(
    sweep: SweepConfig,
    folder: Path,
    *,
    output_dir: str | None = None,
    units_dir: str | None = None,
    overwrite: bool = False,
    fail_fast: bool = False,
    shard: tuple[int, int] | None = None,
    stop_after_h: float | None = None,
    defenses: list[str] | None = None,
    seeds: list[int] | None = None,
    reuse: list[Path] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sweep (or this process's shard of it); returns the aggregate report of every finished run.

    ``defenses``, ``seeds``: run only these defenses' runs, these seeds' runs, or both (the report still covers
    every finished run of the sweep, and ``selected_complete`` says whether the selection is done): a long
    sweep's most wanted rows, or one whole seed, first.

    ``stop_after_h``: start no run that would end past this many hours from the start, judged by the longest run
    this process has finished (before the first, any run starts). A sweep longer than a working session then
    stops with finished runs only; the same command resumes it.

    ``reuse``: other sweeps' output folders or archives; a run not done here whose config one of them finished
    (ftguard.sweep.reuse) is copied from there instead of made.
    """
    from tqdm.auto import tqdm

    from ftguard import distributed

    if distributed.world_size() > 1:
        # A failed run is recorded and the sweep goes on: ranks that disagree on a failure would wait forever.
        raise FtguardError(
            "ftguard sweep runs one process per GPU, not under torchrun or accelerate launch: start one "
            "`ftguard sweep FILE --shard i/n` per GPU (CUDA_VISIBLE_DEVICES=i), sharing the output dir"
        )

    from ftguard.pipeline.run import Pipeline
    from ftguard.sweep.report import write_report

    out = sweep_dir(sweep, output_dir)
    # Units are keyed by content, not by sweep: another sweep's store serves every unit both need (an attack
    # probe reusing the aligned models of the main table trains only its new fine-tunes).
    store = Path(units_dir) if units_dir else out / "units"
    runs = expand(sweep, folder, out)
    selected = select_runs(sweep, runs, defenses, seeds)
    preflight(selected)
    mine = [r for i, r in enumerate(selected) if shard is None or i % shard[1] == shard[0]]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sweep.yaml", _dump(sweep))
    entries: dict[str, Any] = {}  # this process's entries of sweep.json: runs it found done or finished
    start = time.monotonic()
    failures = []
    # A shard does its own runs first, then helps with the others' (in sweep order, seed outermost): the unit
    # locks keep two shards off the same unit, and a shard that ran out of its own work does not sit idle.
    own = {r.id for r in mine}
    others = [r for r in selected if shard is not None and r.id not in own]
    todo = [*mine, *others]
    # runs that found a unit another shard is making, since a run last finished or a waited-for unit was done:
    # the unit's folder, by run
    busy: dict[str, str] = {}
    longest = 0.0  # the longest run this process finished: what the next one is assumed to take
    stopped = 0
    # Runs done before this start are counted up front, so that the rate and ETA reflect the work left.
    for run in [r for r in todo if is_done(r)]:
        entries[run.id] = _entry(run, "complete", None)
        todo.remove(run)
    if reuse:
        entries.update(_reuse(todo, reuse))
        todo = [r for r in todo if r.id not in entries]
    with tqdm(
        total=len(todo) + len(entries),
        initial=len(entries),
        desc=f"sweep {sweep.name}",
        unit="run",
        disable=not progress,
    ) as bar:
        while todo:
            # The first run in sweep order that has not found a unit busy since a run last finished (a unit
            # may be done by now: the earlier runs come first, so a seed's runs finish together). When every
            # remaining run waits on another shard, wait for the first one's unit instead of spinning, then
            # look at them all again: blocking inside that run would also wait on its next busy unit while
            # later runs' units (free once the first is done) could be made.
            free = [r for r in todo if r.id not in busy]
            if not free:
                wait_for_unit(busy[todo[0].id])
                busy.clear()
                continue
            run, wait = free[0], shard is None
            bar.set_postfix_str(run.id, refresh=True)
            if is_done(run):
                entries[run.id] = _entry(run, "complete", None)  # done by another shard meanwhile
                todo.remove(run)
                bar.update(1)
                continue
            if stop_after_h is not None and time.monotonic() - start + longest > stop_after_h * 3600:
                stopped = len(todo)
                log.warning(
                    "sweep %s: %d run(s) not started, the next would end past --stop-after %gh; run the same "
                    "command again to go on",
                    sweep.name,
                    stopped,
                    stop_after_h,
                )
                break
            t0 = time.monotonic()
            try:
                pipeline = Pipeline(run.resolved, overwrite=overwrite, store=store, wait_for_units=wait)
                results = pipeline.run_all()
                status = "complete" if results.get("complete") else "incomplete"
            except UnitBusy as unit:
                log.info("sweep run %s: %s is being made by another process, coming back to it", run.id, unit)
                busy[run.id] = str(unit)
                continue
            except (FtguardError, RuntimeError, OSError, ValueError) as exc:
                if fail_fast:
                    raise
                status = f"failed: {exc}"
                failures.append(run.id)
                log.error("sweep run %s failed: %s", run.id, exc)
            todo.remove(run)
            busy.clear()
            wall = time.monotonic() - t0
            longest = max(longest, wall)
            entries[run.id] = _entry(run, status, round(wall, 1))
            _update_index(out, sweep.name, {run.id: entries[run.id]})
            bar.update(1)
    # Runs finished here are in the index already; those found done are added now, keeping the time recorded
    # by whoever ran them.
    _update_index(out, sweep.name, {k: e for k, e in entries.items() if e["wall_time_s"] is None})
    report = write_report(sweep, runs, out)
    report["wall_time_s"] = round(time.monotonic() - start, 1)
    report["failed"] = failures
    report["not_started"] = stopped
    report["selected_complete"] = all(is_done(r) for r in selected)
    return report


def _reuse(todo: list[SweepRun], folders: list[Path]) -> dict[str, Any]:
    from ftguard.sweep.reuse import reuse_into, sources

    entries = {}
    by_id = {run.id: run for run in todo}
    for run_id, source in sources(todo, folders).items():
        reuse_into(by_id[run_id].config, source)
        log.info("sweep run %s: reused from %s (same config)", run_id, source)
        entries[run_id] = {**_entry(by_id[run_id], "complete", None), "reused_from": str(source)}
    return entries


def select_runs(
    sweep: SweepConfig,
    runs: list[SweepRun],
    defenses: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[SweepRun]:
    """The runs of ``defenses`` and of ``seeds`` (no selection: all); an unknown name or seed fails before any
    work."""
    known_seeds = sorted({r.seed for r in runs})
    if defenses:
        _refuse_unknown(sweep, "--defenses", "defenses", defenses, list(sweep.defenses))
        runs = [r for r in runs if r.defense in defenses]
    if seeds:
        _refuse_unknown(sweep, "--seeds", "seeds", seeds, known_seeds)
        runs = [r for r in runs if r.seed in seeds]
    return runs


def _refuse_unknown(sweep: SweepConfig, option: str, what: str, asked: list, known: list) -> None:
    unknown = [str(x) for x in asked if x not in known]
    if unknown:
        raise FtguardError(
            f"{option}: {', '.join(unknown)} not in sweep {sweep.name} (its {what}: {', '.join(map(str, known))})"
        )


def _entry(run: SweepRun, status: str, wall: float | None) -> dict[str, Any]:
    return {
        "defense": run.defense,
        "seed": run.seed,
        "axes": run.axes,
        "attack": run.attack,
        "dir": str(run.config.out_dir),
        "config_hash": run.config.fingerprint(),
        "status": status,
        "wall_time_s": wall,
    }


def _update_index(out: Path, name: str, entries: dict[str, Any]) -> None:
    """Merge entries into sweep.json under a file lock: shards sharing the directory each add their own runs.
    A run's wall time is all the time spent on it: a run made again (after a failure, or a config change that
    reuses its units) adds its new time to the known one; an entry without a time (found done) keeps it."""
    with file_lock(out / ".sweep.json.lock"):
        index = _read_index(out)
        for key, entry in entries.items():
            known = index.get(key, {}).get("wall_time_s")
            spent = entry.get("wall_time_s")
            total = known if spent is None else spent + (known or 0.0)
            index[key] = {**entry, "wall_time_s": total}
        write_json_atomic(out / "sweep.json", {"name": name, "runs": index})


def _read_index(out: Path) -> dict[str, Any]:
    path = out / "sweep.json"
    return read_json(path).get("runs", {}) if path.is_file() else {}


def _dump(sweep: SweepConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(sweep), sort_keys=False, allow_unicode=True)
