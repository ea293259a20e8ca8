"""Run a config end to end: base → align → finetune (one per harmful ratio) → post → evaluate after each.

Every unit (stage or evaluation point) lives in its own directory and is skipped when already complete with
the same fingerprint; an interrupted training resumes from its last checkpoint. results.json is rewritten
after each unit and says ``"complete": true`` only at the end.

A unit's fingerprint hashes exactly what its output depends on: the config sections its stage reads, the
examples it trains or evaluates on (not the config that selected them) and the fingerprint of the model it
starts from. So the aligned model of a run does not depend on the fine-tuning ratio or task, and with a shared
``store`` (sweeps) every run that needs the same unit finds it already done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ftguard import distributed
from ftguard.config import RunConfig, dump_config
from ftguard.data.plan import DataPlan, build_data_plan
from ftguard.errors import FtguardError
from ftguard.evaluation.judges import get_judge
from ftguard.evaluation.refusal_detector import get_refusal_detector
from ftguard.methods.context import ModelRef
from ftguard.methods.registry import get_method
from ftguard.models import load_tokenizer, resolve_model
from ftguard.pipeline.evaluation import evaluate_point
from ftguard.pipeline.outputs import StageDir, read_json, write_text_atomic
from ftguard.pipeline.post import post_stage
from ftguard.pipeline.results import git_revision, library_versions, write_results
from ftguard.pipeline.stages import train_stage

log = logging.getLogger(__name__)

# The config sections each stage reads; its data enter its fingerprint as example hashes (DataPlan.digest).
STAGE_SECTIONS = {
    "finetune": ("seed", "model", "adapter", "finetune"),
    "post": ("seed", "model", "adapter", "post"),
}
EVAL_ROLES = ("eval_harmful", "over_refusal", "task_eval")
POST_EVAL = ("batch_size", "mixed_precision")


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def post_key_of(finetune_key: str) -> str:
    """finetune → post, finetune-p0.1 → post-p0.1."""
    return "post" + finetune_key[len("finetune") :]


def finetune_keys(run: RunConfig) -> dict[str, float]:
    ratios = run.data.finetune.ratios
    if len(ratios) == 1:
        return {"finetune": ratios[0]}
    return {f"finetune-p{p:g}": p for p in ratios}


class Pipeline:
    def __init__(
        self,
        run: RunConfig,
        *,
        overwrite: bool = False,
        on_update: Callable[[dict], None] | None = None,
        store: Path | None = None,
        wait_for_units: bool = True,
    ) -> None:
        self.run = run
        # False (sweep shards): a unit another process is making raises UnitBusy instead of blocking.
        self.wait_for_units = wait_for_units
        # With a store, units live in <store>/<kind>/<fingerprint> and are shared by every run that needs them.
        self.store = Path(store) if store is not None else None
        self.stage_extras: dict[str, list[str]] = {}  # method data sets (plan.extra) each stage loaded
        self.on_update = (
            on_update  # called with the results after each evaluation point (the CLI prints them)
        )
        self.out = run.out_dir
        self.overwrite = overwrite
        self.plan: DataPlan | None = None
        self.judges: list = []  # the main judge first, then evaluate.extra_judges
        self.refusal_detector = None  # over-refusal; built with the judges, on the rank that judges
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ preparation

    def prepare(self, *, need_judge: bool) -> None:
        """Everything that can fail on bad input, before any training: data, model, judge."""
        run = self.run
        distributed.init()
        self.plan = build_data_plan(run)
        for stage in ("align", "finetune", "post"):
            stage_cfg = getattr(run, stage)
            if stage_cfg is not None:
                method_cls = get_method(stage_cfg.method, stage)
                method = method_cls(method_cls.parse_args(stage_cfg.args, prefix=f"{stage}.args"))
                distributed.check_supported(method, stage, distributed.launch_mode())
                before = dict(self.plan.extra)
                method.prepare_data(self.plan, run, stage)
                self.stage_extras[stage] = sorted(
                    k for k, v in self.plan.extra.items() if before.get(k) is not v
                )
                stage_sets = {"align": [self.plan.alignment], "finetune": list(self.plan.mixes.values())}.get(
                    stage, []
                )
                for examples in stage_sets:
                    method.train_examples(examples, self.plan)  # dry run: impossible requests fail now
        self.base = ModelRef(model_dir=resolve_model(run.model.name))
        load_tokenizer(self.base.model_dir, trust_remote_code=run.model.trust_remote_code)
        if need_judge and distributed.is_main():  # the judges run once, on rank 0's gathered answers
            ev = run.evaluate
            self.judges = [
                get_judge(ev.judge, **ev.judge_options),
                *(get_judge(name) for name in ev.extra_judges),
            ]
            if ev.over_refusal_prompts is not None:
                self.refusal_detector = get_refusal_detector(ev.refusal_detector)
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

    # ------------------------------------------------------------------ fingerprints

    def _data(self, stage: str, *roles: str) -> str:
        extras = [f"extra:{name}" for name in self.stage_extras.get(stage, [])]
        return self.plan.digest(*roles, *extras)

    def fp_align(self) -> str:
        if self.run.align is None:
            return _hash("base", self.run.to_dict()["model"])
        adapter = self.run.to_dict()["adapter"]
        return _hash(
            "align",
            self.run.fingerprint("seed", "model", "align"),
            {"topology": adapter["topology"], "align": adapter["align"]},  # not the fine-tuning LoRA
            self._data("align", "alignment", "alignment_harmful"),
        )

    def fp_finetune(self, p: float) -> str:
        return _hash(
            "finetune",
            self.fp_align(),
            self.run.fingerprint(*STAGE_SECTIONS["finetune"]),
            self._data("finetune", f"mix:{p}", "alignment", "alignment_harmful"),
        )

    def fp_post(self, p: float) -> str:
        return _hash(
            "post",
            self.fp_finetune(p),
            self.fp_align(),
            self.run.fingerprint(*STAGE_SECTIONS["post"]),
            # Repairs that guard the task (recovery) score it with the evaluation's task settings.
            {
                k: v
                for k, v in self.run.to_dict()["evaluate"].items()
                if k.startswith("task_") or k in POST_EVAL
            },
            self._data("post", "task_validation", "alignment", "alignment_harmful"),
        )

    def fp_eval(self, upstream: str) -> str:
        settings = {k: v for k, v in self.run.to_dict()["evaluate"].items() if k != "points"}
        return _hash("eval", upstream, settings, self.plan.digest(*EVAL_ROLES))

    def _unit(self, key: str, fingerprint: str) -> StageDir:
        if self.store is None:
            return StageDir(self.out / key, fingerprint, overwrite=self.overwrite)
        kind = "eval" if key.startswith("eval/") else key.split("-")[0]
        return StageDir(self.store / kind / fingerprint, fingerprint, overwrite=self.overwrite)

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

    def _record(
        self, key: str, stage: str, method: str | None, p: float | None, metrics: dict[str, Any]
    ) -> None:
        self.results["stages"][key] = {
            "stage": stage,
            "method": method,
            "harmful_ratio": p,
            **metrics,
            "judge": self.run.evaluate.judge,
            "model": self.run.model.name,
            "seed": self.run.seed,
            "config_hash": self.results["config_hash"],
        }
        write_results(self.out, self.results)
        if self.on_update and distributed.is_main():
            self.on_update(self.results)

    # ------------------------------------------------------------------ units

    def evaluate(
        self,
        key: str,
        stage: str,
        method: str | None,
        p: float | None,
        ref: ModelRef,
        upstream: str,
    ) -> None:
        unit = self._unit(f"eval/{key}", self.fp_eval(upstream))
        with self._hold(unit):
            if unit.is_complete():
                log.info("%s: evaluation already complete, skipped", key)
                metrics = unit.manifest()["metrics"]
            else:
                metrics = evaluate_point(
                    self.run, key, ref.model_dir, self.plan, self.judges, unit, self.refusal_detector
                )
        self._record(key, stage, method, p, metrics)

    def align(self) -> ModelRef:
        run = self.run
        unit = self._unit("align", self.fp_align())
        with self._hold(unit):
            if unit.is_complete():
                log.info("align: already complete, skipped")
                return ModelRef.from_manifest(unit.path, unit.manifest())
            return train_stage(run, "align", "align", self.plan.alignment, self.plan, self.base, unit)

    def aligned_ref(self) -> ModelRef:
        """The input of the finetune stage: the aligned model, or the base model when align is null."""
        if self.run.align is None:
            return self.base
        unit = self._unit("align", self.fp_align())
        if not unit.is_complete():
            raise FtguardError(
                f"the align stage in {unit.path} is not complete: run `ftguard align` (or `ftguard run`) first"
            )
        return ModelRef.from_manifest(unit.path, unit.manifest())

    def post(self, key: str, p: float, finetuned: ModelRef) -> ModelRef:
        unit = self._unit(key, self.fp_post(p))
        with self._hold(unit):
            if unit.is_complete():
                log.info("%s: already complete, skipped", key)
                return ModelRef.from_manifest(unit.path, unit.manifest())
            if distributed.is_main():
                return post_stage(
                    self.run,
                    key,
                    self.plan,
                    base=self.base,
                    aligned=self.aligned_ref(),
                    finetuned=finetuned,
                    out=unit,
                    harmful_ratio=p,
                )
        # A repair runs in one process: the other ranks wait on the unit's lock, which rank 0 holds until the unit
        # is complete (a file lock, so a long repair does not run into the process group's timeout).
        with unit.lock():
            return ModelRef.from_manifest(unit.path, unit.manifest())

    def finetune(self, key: str, p: float, source: ModelRef) -> ModelRef:
        unit = self._unit(key, self.fp_finetune(p))
        with self._hold(unit):
            if unit.is_complete():
                log.info("%s: already complete, skipped", key)
                return ModelRef.from_manifest(unit.path, unit.manifest())
            return train_stage(
                self.run, "finetune", key, self.plan.mixes[p], self.plan, source, unit, harmful_ratio=p
            )

    # ------------------------------------------------------------------ drivers

    def _existing(self, unit: StageDir) -> ModelRef | None:
        return ModelRef.from_manifest(unit.path, unit.manifest()) if unit.is_complete() else None

    def run_all(
        self, train: tuple[str, ...] = ("align", "finetune", "post"), evaluate: bool = True
    ) -> dict[str, Any]:
        """Train the stages named in ``train`` (others are used if already complete) and, with ``evaluate``,
        evaluate every configured point whose model exists."""
        run = self.run
        configured = set(run.evaluate.points)
        points = configured if evaluate else set()
        start = time.monotonic()
        self.prepare(need_judge=bool(points))
        expected = {"base"} & configured
        if "base" in points:
            self.evaluate("base", "base", None, None, self.base, _hash("base", run.to_dict()["model"]))
        source: ModelRef | None = self.base
        if run.align is not None:
            expected |= {"align"} & configured
            source = (
                self.align() if "align" in train else self._existing(self._unit("align", self.fp_align()))
            )
            if source is not None and "align" in points:
                self.evaluate("align", "align", run.align.method, None, source, self.fp_align())
        if run.finetune is not None:
            for key, p in finetune_keys(run).items():
                expected |= {key} if "finetune" in configured else set()
                if "finetune" in train:
                    ref = self.finetune(key, p, self.aligned_ref())
                else:
                    ref = self._existing(self._unit(key, self.fp_finetune(p)))
                if ref is not None and "finetune" in points:
                    self.evaluate(key, "finetune", run.finetune.method, p, ref, self.fp_finetune(p))
                if run.post is not None:
                    post_key = post_key_of(key)
                    expected |= {post_key} if "post" in configured else set()
                    if "post" in train and ref is not None:
                        repaired = self.post(post_key, p, ref)
                    else:
                        repaired = self._existing(self._unit(post_key, self.fp_post(p)))
                    if repaired is not None and "post" in points:
                        self.evaluate(post_key, "post", run.post.method, p, repaired, self.fp_post(p))
        trained_all = all(self._existing(u) for u in self._training_units())
        self.results["complete"] = trained_all and expected <= set(self.results["stages"])
        self.results["wall_time_s"] = round(time.monotonic() - start, 1)
        write_results(self.out, self.results)
        return self.results

    def _training_units(self) -> list[StageDir]:
        units = [self._unit("align", self.fp_align())] if self.run.align is not None else []
        keys = finetune_keys(self.run).items()
        if self.run.finetune is not None:
            units += [self._unit(key, self.fp_finetune(p)) for key, p in keys]
        if self.run.post is not None:
            units += [self._unit(post_key_of(key), self.fp_post(p)) for key, p in keys]
        return units


def run_pipeline(
    run: RunConfig,
    *,
    overwrite: bool = False,
    train: tuple[str, ...] = ("align", "finetune", "post"),
    evaluate: bool = True,
    on_update: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    return Pipeline(run, overwrite=overwrite, on_update=on_update).run_all(train, evaluate)


def evaluate_model_dir(run: RunConfig, model_dir: str, *, key: str | None = None) -> dict[str, Any]:
    """Evaluate any model folder (or hub id) with the run's evaluation settings; output in <run>/eval/<key>."""
    pipe = Pipeline(run)
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


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FtguardError(f"{path} not found: is '{run_dir}' an ftguard run directory?")
    return read_json(path)
