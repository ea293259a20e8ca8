"""Run a config end to end: base → align → finetune (one per harmful ratio) → evaluate after each.

Every unit (stage or evaluation point) lives in its own directory under the run's output dir and is
skipped when already complete for the same config; an interrupted training resumes from its last
checkpoint. results.json is rewritten after each unit and says ``"complete": true`` only at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftguard.config import RunConfig, dump_config
from ftguard.errors import FtguardError
from ftguard.evaluation.judges import get_judge
from ftguard.models import load_tokenizer, resolve_model
from ftguard.pipeline.evaluation import evaluate_point
from ftguard.pipeline.outputs import StageDir, read_json, write_text_atomic
from ftguard.pipeline.plan import DataPlan, build_data_plan
from ftguard.pipeline.post import post_stage
from ftguard.pipeline.results import git_revision, library_versions, write_results
from ftguard.pipeline.stages import ModelRef, train_stage
from ftguard.registry import get_method

log = logging.getLogger(__name__)

# What each unit's output depends on: a change elsewhere (e.g. evaluation settings) must not retrain.
TRAIN_SECTIONS = ("seed", "model", "adapter", "data", "align")
POST_SECTIONS = (*TRAIN_SECTIONS, "finetune", "post")


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
        self, run: RunConfig, *, overwrite: bool = False, on_update: Callable[[dict], None] | None = None
    ) -> None:
        self.run = run
        self.on_update = (
            on_update  # called with the results after each evaluation point (the CLI prints them)
        )
        self.out = run.out_dir
        self.overwrite = overwrite
        self.plan: DataPlan | None = None
        self.judges: list = []  # the main judge first, then evaluate.extra_judges
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ preparation

    def prepare(self, *, need_judge: bool) -> None:
        """Everything that can fail on bad input, before any training: data, model, judge."""
        run = self.run
        self.plan = build_data_plan(run)
        for stage in ("align", "finetune", "post"):
            stage_cfg = getattr(run, stage)
            if stage_cfg is not None:
                method_cls = get_method(stage_cfg.method, stage)
                method = method_cls(method_cls.parse_args(stage_cfg.args, prefix=f"{stage}.args"))
                method.prepare_data(self.plan, run, stage)
                stage_sets = {"align": [self.plan.alignment], "finetune": list(self.plan.mixes.values())}.get(
                    stage, []
                )
                for examples in stage_sets:
                    method.train_examples(examples, self.plan)  # dry run: impossible requests fail now
        self.base = ModelRef(model_dir=resolve_model(run.model.name))
        load_tokenizer(self.base.model_dir, trust_remote_code=run.model.trust_remote_code)
        if need_judge:
            ev = run.evaluate
            self.judges = [
                get_judge(ev.judge, **ev.judge_options),
                *(get_judge(name) for name in ev.extra_judges),
            ]
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
            "stages": self._previous_stages(),
        }

    def _previous_stages(self) -> dict[str, Any]:
        """Entries of earlier single-stage commands (`ftguard align`, then `ftguard finetune`) of this config."""
        path = self.out / "results.json"
        if path.exists():
            old = read_json(path)
            if old.get("config_hash") == self.run.fingerprint():
                return old.get("stages", {})
        return {}

    def _unit(self, key: str, *sections: str) -> StageDir:
        return StageDir(self.out / key, self.run.fingerprint(*sections), overwrite=self.overwrite)

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
        if self.on_update:
            self.on_update(self.results)

    # ------------------------------------------------------------------ units

    def evaluate(
        self,
        key: str,
        stage: str,
        method: str | None,
        p: float | None,
        ref: ModelRef,
        upstream: tuple[str, ...],
    ) -> None:
        unit = self._unit(f"eval/{key}", *upstream, "evaluate")
        if unit.is_complete():
            log.info("%s: evaluation already complete, skipped", key)
            metrics = unit.manifest()["metrics"]
        else:
            metrics = evaluate_point(self.run, key, ref.model_dir, self.plan, self.judges, unit)
        self._record(key, stage, method, p, metrics)

    def align(self) -> ModelRef:
        run = self.run
        unit = self._unit("align", *TRAIN_SECTIONS)
        if unit.is_complete():
            log.info("align: already complete, skipped")
            return ModelRef.from_manifest(unit.path, unit.manifest())
        return train_stage(run, "align", "align", self.plan.alignment, self.plan, self.base, unit)

    def aligned_ref(self) -> ModelRef:
        """The input of the finetune stage: the aligned model, or the base model when align is null."""
        if self.run.align is None:
            return self.base
        unit = self._unit("align", *TRAIN_SECTIONS)
        if not unit.is_complete():
            raise FtguardError(
                f"the align stage in {unit.path} is not complete: run `ftguard align` (or `ftguard run`) first"
            )
        return ModelRef.from_manifest(unit.path, unit.manifest())

    def post(self, key: str, p: float, finetuned: ModelRef) -> ModelRef:
        unit = self._unit(key, *POST_SECTIONS)
        if unit.is_complete():
            log.info("%s: already complete, skipped", key)
            return ModelRef.from_manifest(unit.path, unit.manifest())
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

    def finetune(self, key: str, p: float, source: ModelRef) -> ModelRef:
        unit = self._unit(key, *TRAIN_SECTIONS, "finetune")
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
            self.evaluate("base", "base", None, None, self.base, ("seed", "model", "data"))
        source: ModelRef | None = self.base
        if run.align is not None:
            expected |= {"align"} & configured
            source = (
                self.align() if "align" in train else self._existing(self._unit("align", *TRAIN_SECTIONS))
            )
            if source is not None and "align" in points:
                self.evaluate("align", "align", run.align.method, None, source, TRAIN_SECTIONS)
        if run.finetune is not None:
            for key, p in finetune_keys(run).items():
                expected |= {key} if "finetune" in configured else set()
                if "finetune" in train:
                    ref = self.finetune(key, p, self.aligned_ref())
                else:
                    ref = self._existing(self._unit(key, *TRAIN_SECTIONS, "finetune"))
                if ref is not None and "finetune" in points:
                    self.evaluate(key, "finetune", run.finetune.method, p, ref, (*TRAIN_SECTIONS, "finetune"))
                if run.post is not None:
                    post_key = post_key_of(key)
                    expected |= {post_key} if "post" in configured else set()
                    if "post" in train and ref is not None:
                        repaired = self.post(post_key, p, ref)
                    else:
                        repaired = self._existing(self._unit(post_key, *POST_SECTIONS))
                    if repaired is not None and "post" in points:
                        self.evaluate(post_key, "post", run.post.method, p, repaired, POST_SECTIONS)
        trained_all = all(self._existing(u) for u in self._training_units())
        self.results["complete"] = trained_all and expected <= set(self.results["stages"])
        self.results["wall_time_s"] = round(time.monotonic() - start, 1)
        write_results(self.out, self.results)
        return self.results

    def _training_units(self) -> list[StageDir]:
        units = [self._unit("align", *TRAIN_SECTIONS)] if self.run.align is not None else []
        if self.run.finetune is not None:
            units += [self._unit(key, *TRAIN_SECTIONS, "finetune") for key in finetune_keys(self.run)]
        if self.run.post is not None:
            units += [self._unit(post_key_of(key), *POST_SECTIONS) for key in finetune_keys(self.run)]
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
        else evaluate_point(run, key, ref.model_dir, pipe.plan, pipe.judges, unit)
    )
    return metrics


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FtguardError(f"{path} not found: is '{run_dir}' an ftguard run directory?")
    return read_json(path)
