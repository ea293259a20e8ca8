"""Run a config end to end: base → align → finetune (one per harmful ratio) → post → evaluate after each.

The run is a walk over its unit graph (ftguard.pipeline.units): every unit (stage or evaluation point) lives in
its own directory and is skipped when already complete with the same fingerprint; an interrupted training resumes
from its last checkpoint. results.json is rewritten after each unit and says ``"complete": true`` only at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ftguard import distributed
from ftguard.attacks.base import Upload
from ftguard.config import RunConfig, dump_config
from ftguard.data.example import Example
from ftguard.errors import FtguardError
from ftguard.evaluation.judges import get_judge, judge_versions
from ftguard.evaluation.judges.base import UnreadableAsDegenerate
from ftguard.evaluation.refusal_detector import get_refusal_detector
from ftguard.methods.context import ModelRef
from ftguard.model_card import write_model_card
from ftguard.models import load_tokenizer, resolve_model
from ftguard.pipeline.evaluation import evaluate_point
from ftguard.pipeline.outputs import StageDir, read_json, write_json_atomic, write_text_atomic
from ftguard.pipeline.post import post_stage
from ftguard.pipeline.results import git_revision, library_versions, write_results
from ftguard.pipeline.stages import train_stage
from ftguard.pipeline.units import RunGraph, Unit, build_graph
from ftguard.resolve import ResolvedRun, resolve_run

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(
        self,
        resolved: ResolvedRun,
        *,
        overwrite: bool = False,
        on_update: Callable[[dict], None] | None = None,
        store: Path | None = None,
        wait_for_units: bool = True,
    ) -> None:
        if not isinstance(resolved, ResolvedRun):
            raise TypeError(
                "Pipeline takes a ResolvedRun: ftguard.resolve.load_run(...) or resolve_run(config)"
            )
        self.resolved = resolved
        self.run = resolved.config
        # False (sweep shards): a unit another process is making raises UnitBusy instead of blocking.
        self.wait_for_units = wait_for_units
        # With a store, units live in <store>/<kind>/<fingerprint> and are shared by every run that needs them.
        self.store = Path(store) if store is not None else None
        self.on_update = (
            on_update  # called with the results after each evaluation point (the CLI prints them)
        )
        self.out = self.run.out_dir
        self.overwrite = overwrite
        self.graph: RunGraph | None = None
        self.judges: list = []  # the main judge first, then evaluate.extra_judges
        self.refusal_detector = None  # over-refusal; built with the judges, on the rank that judges
        self.results: dict[str, Any] = {}

    @property
    def plan(self):
        return self.graph.plan if self.graph is not None else None

    # ------------------------------------------------------------------ preparation

    def prepare(self, *, need_judge: bool) -> None:
        """Everything that can fail on bad input, before any training: data, model, judge."""
        run = self.run
        distributed.init()
        for stage, method in self.resolved.methods.items():
            distributed.check_supported(method, stage, distributed.launch_mode())
        self.graph = build_graph(self.resolved)
        stage_sets = {"align": [self.plan.align_examples()], "finetune": list(self.plan.mixes.values())}
        for stage, method in self.resolved.methods.items():
            method.load_resources()
            for examples in stage_sets.get(stage, []):
                method.train_examples(examples, self.plan)  # dry run: impossible requests fail now
        self.base = ModelRef(model_dir=resolve_model(run.model.name))
        load_tokenizer(self.base.model_dir, trust_remote_code=run.model.trust_remote_code)
        if need_judge and distributed.is_main():  # the judges run once, on rank 0's gathered answers
            ev = run.evaluate
            self.judges = [
                get_judge(ev.judge, **ev.judge_options),
                *(get_judge(name) for name in ev.extra_judges),
            ]
            if ev.unreadable_as_degenerate:
                self.judges = [UnreadableAsDegenerate(judge) for judge in self.judges]
            if ev.over_refusal_prompts is not None or ev.instruction_prompts is not None:
                self.refusal_detector = get_refusal_detector(ev.refusal_detector)
            if self.plan.task.metric == "winrate":
                from ftguard.evaluation.task_score import pairwise_judge

                pairwise_judge(
                    ev
                )  # a missing key or model fails now, not after training (built once, cached)
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "config.yaml", dump_config(run))
        self.results = {
            "ftguard_version": library_versions()["ftguard"],
            "complete": False,
            "name": run.name,
            "description": run.description,
            "model": run.model.name,
            "seed": run.seed,
            "config_hash": run.fingerprint(),
            "judge": self.judges[0].describe() if self.judges else None,
            "extra_judges": [j.describe() for j in self.judges[1:]],
            # what a sweep's resume compares: a refit judge must re-evaluate a finished run, not skip it
            "judge_versions": judge_versions(
                run.evaluate.judge, run.evaluate.judge_options, run.evaluate.extra_judges
            ),
            "versions": library_versions(),
            "git": git_revision(),
            "data": self.plan.report(),
            "config": run.to_dict(),
            "stages": {} if self.overwrite else self._previous_stages(),
        }
        if self.overwrite:
            # The old results describe outputs that --overwrite is about to replace: a failure before the first
            # evaluation must not leave them behind marked complete.
            write_results(self.out, self.results)

    def _previous_stages(self) -> dict[str, Any]:
        """Entries of earlier single-stage commands (`ftguard align`, then `ftguard finetune`) of this config."""
        path = self.out / "results.json"
        if path.exists():
            old = read_json(path)
            if old.get("config_hash") == self.run.fingerprint():
                return old.get("stages", {})
        return {}

    def _dir(self, unit: Unit) -> StageDir:
        if self.store is None:
            return StageDir(self.out / unit.key, unit.fingerprint, overwrite=self.overwrite)
        return StageDir(self.store / unit.kind / unit.fingerprint, unit.fingerprint, overwrite=self.overwrite)

    @contextlib.contextmanager
    def _hold(self, unit: StageDir) -> Iterator[None]:
        """``unit.lock()`` for all the ranks of a launch, which make a unit together: rank 0 alone takes the lock
        (so another process sharing the store still waits) and settles the unit first (``is_complete`` removes
        it under --overwrite, or fails on another config's output), then the others look at it."""
        if distributed.world_size() <= 1:
            with unit.lock(wait=self.wait_for_units):
                yield
            return
        with unit.lock() if distributed.is_main() else contextlib.nullcontext():
            if distributed.is_main():
                unit.is_complete()
            distributed.barrier()
            yield

    def _record(self, unit: Unit, metrics: dict[str, Any]) -> None:
        self.results["stages"][unit.point_key] = {
            "stage": unit.point,
            "method": unit.method,
            "harmful_ratio": unit.harmful_ratio,
            **metrics,
            "judge": self.run.evaluate.judge,
            "model": self.run.model.name,
            "seed": self.run.seed,
            "config_hash": self.results["config_hash"],
            "generations": self._generations(unit),
        }
        write_results(self.out, self.results)
        if self.on_update and distributed.is_main():
            self.on_update(self.results)

    def _generations(self, unit: Unit) -> str:
        """Where an evaluation point's answers are: relative to the run folder, or the shared units store's file
        (a sweep's runs keep their evaluations there), so that a report or an audit finds them from results.json."""
        path = self._dir(unit).path / "generations.jsonl"
        try:
            return str(path.relative_to(self.out))
        except ValueError:
            return str(path.resolve())

    def _record_training(self, unit: Unit) -> None:
        """What the unit behind a point was trained in and on: a study resumed on another machine (bf16-native or
        not, docs/evaluation-precision.md; another CPU kind, docs/testbed.md) reuses units by config, so
        results.json says which precision and hardware each came from.
        The method's own report goes with it (what the filter removed, what a repair chose): units are not
        archived, results.json is."""
        manifest = self._dir(unit).manifest()
        record = {
            "method": manifest.get("method"),
            "precision": manifest.get("precision"),
            "hardware": manifest.get("hardware"),
            "steps": manifest.get("steps"),
            "runtime_s": manifest.get("train_runtime_s", manifest.get("runtime_s")),
        }
        report = manifest.get("method_data") or manifest.get("report")
        if report:
            record["report"] = report
        self.results.setdefault("trained", {})[unit.key] = record

    # ------------------------------------------------------------------ units

    def evaluate(self, unit: Unit, ref: ModelRef) -> None:
        out = self._dir(unit)
        with self._hold(out):
            if out.is_complete():
                log.info("%s: evaluation already complete, skipped", unit.point_key)
                metrics = out.manifest()["metrics"]
            else:
                attack = self.resolved.attack
                # the trigger is the attacker's, taught by the fine-tune: models before it are asked plainly
                taught = attack is not None and attack.has_trigger and unit.point in ("finetune", "post")
                metrics = evaluate_point(
                    self.run,
                    unit.point_key,
                    ref.model_dir,
                    self.plan,
                    self.judges,
                    out,
                    self.refusal_detector,
                    trigger=attack.trigger if taught else None,
                )
        self._record(unit, metrics)
        # the base model's folder (the model cache, a user's folder) is not the run's to write into
        if unit.point != "base" and distributed.is_main():
            write_model_card(ref.model_dir, self.results, unit.point_key)

    def _existing(self, unit: Unit) -> ModelRef | None:
        out = self._dir(unit)
        return ModelRef.from_manifest(out.path, out.manifest()) if out.is_complete() else None

    def aligned_ref(self) -> ModelRef:
        """The input of the finetune stage: the aligned model, or the base model when align is null."""
        if self.run.align is None:
            return self.base
        unit = self.graph.unit("align")
        found = self._existing(unit)
        if found is None:
            raise FtguardError(
                f"the align stage in {self._dir(unit).path} is not complete: run `ftguard align` (or `ftguard run`) "
                "first"
            )
        return found

    def upload(self, unit: Unit, source: ModelRef, out: StageDir) -> list[Example]:
        """The fine-tune's rows: the data plan's upload, or, for an attack that reads the model, what it makes
        of the plan's candidates with the aligned model (its report kept beside the unit, attack.json)."""
        examples = self.plan.mixes[unit.harmful_ratio]
        attack = self.resolved.attack
        if attack is None or not attack.needs_model:
            return examples
        report = self.plan.mix_reports[unit.harmful_ratio]
        upload = self._adapted_upload(unit, source, Upload(examples, report))
        if distributed.is_main():
            out.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out.path / "attack.json", upload.report)
        self.results["data"]["mixes"][f"{unit.harmful_ratio:g}"] = upload.report
        return upload.examples

    def _adapted_upload(self, unit: Unit, source: ModelRef, candidates: Upload) -> Upload:
        """``attack.adapt`` of the candidates, made once per aligned model and kept beside the units: every
        defense fine-tuned from the same aligned model receives the same upload (the attacker does not see the
        defense), and Virus takes tens of minutes per upload on a CPU. Keyed by what adapt reads: the attack and
        its args, the aligned model, the candidate rows, the seed, and the model and adapter settings (the fresh
        LoRA an attacker's gradient is taken on)."""
        attack = self.resolved.attack
        key = hashlib.sha256(
            json.dumps(
                [
                    attack.describe(),
                    unit.upstream,
                    self.plan.digest(f"mix:{unit.harmful_ratio}"),
                    self.run.seed,
                    self.run.to_dict()["model"],
                    self.run.to_dict()["adapter"],
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:16]
        root = self.store if self.store is not None else self.out
        cache = StageDir(root / "upload" / key, key, overwrite=self.overwrite)
        with cache.lock():
            if cache.is_complete():
                rows = [json.loads(line) for line in (cache.path / "upload.jsonl").read_text().splitlines()]
                examples = [
                    Example(**{**row, "messages": tuple(map(tuple, row["messages"]))}) for row in rows
                ]
                return Upload(examples, cache.manifest()["report"])
            upload = attack.adapt(candidates, source.model_dir, self.run, self.run.seed)
            # whichever rank holds the lock first makes it (the others then read it): the file lock, not rank 0
            staging = cache.begin()
            write_text_atomic(
                staging / "upload.jsonl",
                "".join(json.dumps(dataclasses.asdict(ex)) + "\n" for ex in upload.examples),
            )
            cache.commit({"attack": attack.describe(), "report": upload.report})
            return upload

    def train(self, unit: Unit, source: ModelRef) -> ModelRef:
        """Make one align, finetune or post unit from ``source`` (skipped when already complete)."""
        out = self._dir(unit)
        method = self.resolved.method(unit.kind)
        with self._hold(out):
            if out.is_complete():
                log.info("%s: already complete, skipped", unit.key)
                return ModelRef.from_manifest(out.path, out.manifest())
            if unit.kind != "post":
                examples = (
                    self.plan.align_examples() if unit.kind == "align" else self.upload(unit, source, out)
                )
                return train_stage(
                    self.run,
                    unit.kind,
                    unit.key,
                    examples,
                    self.plan,
                    source,
                    out,
                    harmful_ratio=unit.harmful_ratio,
                    method=method,
                )
            if distributed.is_main():
                return post_stage(
                    self.run,
                    unit.key,
                    self.plan,
                    method=method,
                    base=self.base,
                    aligned=self.aligned_ref(),
                    finetuned=source,
                    out=out,
                    harmful_ratio=unit.harmful_ratio,
                )
        # A repair runs in one process: the other ranks wait on the unit's lock, which rank 0 holds until the unit
        # is complete (a file lock, so a long repair does not run into the process group's timeout).
        with out.lock():
            return ModelRef.from_manifest(out.path, out.manifest())

    # ------------------------------------------------------------------ driver

    def run_all(
        self, train: tuple[str, ...] = ("align", "finetune", "post"), evaluate: bool = True
    ) -> dict[str, Any]:
        """Walk the unit graph: train the stages named in ``train`` (others are used if already complete) and, with
        ``evaluate``, evaluate every configured point whose model exists."""
        start = time.monotonic()
        self.prepare(need_judge=evaluate and bool(self.run.evaluate.points))
        graph = self.graph
        models: dict[str, ModelRef | None] = {graph.fingerprints.base(): self.base}
        for unit in graph.units:
            source = models.get(unit.upstream)
            if unit.kind == "eval":
                if evaluate and source is not None:
                    self.evaluate(unit, source)
            elif unit.kind in train and unit.kind == "finetune":
                models[unit.fingerprint] = self.train(unit, self.aligned_ref())
            elif unit.kind in train and source is not None:
                models[unit.fingerprint] = self.train(unit, source)
            else:
                models[unit.fingerprint] = self._existing(unit)
            if unit.kind != "eval" and models.get(unit.fingerprint) is not None:
                self._record_training(unit)
        trained_all = all(self._existing(u) for u in graph.units if u.kind != "eval")
        expected = {u.point_key for u in graph.units if u.kind == "eval"}
        self.results["complete"] = trained_all and expected <= set(self.results["stages"])
        self.results["wall_time_s"] = round(time.monotonic() - start, 1)
        write_results(self.out, self.results)
        return self.results


def run_pipeline(
    run: ResolvedRun | RunConfig,
    *,
    overwrite: bool = False,
    train: tuple[str, ...] = ("align", "finetune", "post"),
    evaluate: bool = True,
    on_update: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    resolved = run if isinstance(run, ResolvedRun) else resolve_run(run)
    return Pipeline(resolved, overwrite=overwrite, on_update=on_update).run_all(train, evaluate)


def evaluate_model_dir(
    run: ResolvedRun | RunConfig, model_dir: str, *, key: str | None = None
) -> dict[str, Any]:
    """Evaluate any model folder (or hub id) with the run's evaluation settings; output in <run>/eval/<key>."""
    pipe = Pipeline(run if isinstance(run, ResolvedRun) else resolve_run(run))
    run = pipe.run
    pipe.prepare(need_judge=True)
    path = Path(model_dir)
    key = key or (path.name if path.exists() else model_dir.replace("/", "--"))
    ref = ModelRef(model_dir=resolve_model(model_dir))
    unit = StageDir(pipe.out / "eval" / f"custom-{key}", run.fingerprint("evaluate", "data", "model") + key)
    metrics = (
        unit.manifest()["metrics"]
        if unit.is_complete()
        else evaluate_point(run, key, ref.model_dir, pipe.plan, pipe.judges, unit, pipe.refusal_detector)
    )
    return metrics
