"""`ftguard sweep --reuse DIR`: take a finished run of another sweep whose config is this run's, instead of
making it again.

Sweeps overlap: an attack suite's `harmful_mix` cells are the main study's runs, an extension's baseline is the
table's. The unit store already shares their training while it lives; a sweep's archived results (config and
results.json, no weights) outlive it, across machines. A run is taken only when the other run is complete, was
judged by the judges this run would use (same versions), and its config equals this run's in every field but
the run's name and output folder, the same comparison a sweep makes to resume its own archived runs. The copy
keeps the other run's results, environment and wall time, is renamed to this run, and says where it came from
(``reused_from``), so that compute is counted once and a reader can trace every number to the run that made it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ftguard.config import RunConfig, dump_config
from ftguard.errors import FtguardError
from ftguard.evaluation.judges import judge_versions
from ftguard.pipeline.outputs import read_json, write_json_atomic, write_text_atomic
from ftguard.pipeline.results import markdown_table
from ftguard.schema import ConfigError, from_dict

log = logging.getLogger(__name__)


def config_key(config: RunConfig) -> str:
    """What two runs must share to be the same computation: every field but where it is written and its name."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("name", "output_dir")}
    return json.dumps(fields, sort_keys=True, default=str)


def finished_runs(folders: Iterable[Path]) -> dict[str, Path]:
    """{config key: run folder} of the complete runs under each folder's ``runs/`` (a sweep's output folder or
    its archive); the first folder given wins a config two of them hold."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not (folder / "runs").is_dir():
            raise FtguardError(
                f"--reuse {folder}: no runs/ folder there; give a sweep's output folder or its archive "
                "(docs/results/<sweep>)"
            )
        for path in sorted(folder.glob("runs/*/*/results.json")):
            results = read_json(path)
            if not results.get("complete") or results.get("reused_from") or not results.get("config"):
                continue  # a copy names its source; reusing the source keeps the trail one step long
            try:
                config = from_dict(RunConfig, results["config"])
            except (ConfigError, TypeError, ValueError):
                continue  # written under a schema that has changed since: not this code's computation
            found.setdefault(config_key(config), path.parent)
    return found


def sources(runs: Iterable[Any], folders: Iterable[Path]) -> dict[str, Path]:
    """{run id: the finished run folder it can be copied from} for the ``runs`` (SweepRuns) that ``folders`` hold
    under the same config, judged by the judges (same versions) this run would use."""
    found = finished_runs(folders)
    out = {}
    for run in runs:
        source = found.get(config_key(run.config))
        if source is not None and judged_alike(run.config, read_json(source / "results.json")):
            out[run.id] = source
    return out


def judged_alike(config: RunConfig, results: dict[str, Any]) -> bool:
    """Whether the finished ``results`` were judged by the judges, at the versions, that ``config`` would use: a
    judge refit since (ftguard-judge's heads) leaves the config as it was, so a run judged before must be
    evaluated again."""
    ev = config.evaluate
    return results.get("judge_versions", {}) == judge_versions(ev.judge, ev.judge_options, ev.extra_judges)


def reuse_into(config: RunConfig, source: Path) -> dict[str, Any]:
    """Copy the finished run in ``source`` (one that ``sources`` found) into ``config``'s folder as this run;
    returns the new results."""
    results = read_json(source / "results.json")
    if not judged_alike(config, results):
        raise FtguardError(f"--reuse {source}: judged by other judge versions than {config.name} would be")
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # generations and manifests where the source kept them (an archive does not)
    for item in source.iterdir():
        if item.name in ("results.json", "results.md", "config.yaml"):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
    results = {
        **results,
        "name": config.name,
        "config_hash": config.fingerprint(),
        "config": config.to_dict(),
        "reused_from": {"run": results.get("name"), "dir": str(source)},
    }
    write_text_atomic(out / "config.yaml", dump_config(config))
    write_text_atomic(out / "results.md", markdown_table(results))
    write_json_atomic(out / "results.json", results)  # last: a run is done when its results say complete
    return results
