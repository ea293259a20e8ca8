"""The unit graph of a run: every model it trains and every point it evaluates, with their fingerprints.

One function, ``build_graph``, computes it from the resolved run (data plan, method data, fingerprints); `ftguard
run` walks it, and the sweep's ``--dry-run`` and its estimate count it, so that estimates and runs agree unit for
unit.

A unit's fingerprint hashes exactly what its output depends on: the config sections its stage reads, the examples
it trains or evaluates on (not the config that selected them) and the fingerprint of the model it starts from. So
the aligned model of a run does not depend on the fine-tuning ratio, task or LoRA, and with a shared store
(sweeps) every run that needs the same unit finds it already done. Changing how a fingerprint is computed
invalidates every stored unit: tests/test_units.py checks them against an archived sweep.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ftguard.config import RunConfig
from ftguard.data.plan import DataPlan, build_data_plan
from ftguard.evaluation.judges import judge_versions
from ftguard.resolve import ResolvedRun

# The config sections each stage reads; its data enter its fingerprint as example hashes (DataPlan.digest).
STAGE_SECTIONS = {
    "finetune": ("seed", "model", "adapter", "finetune"),
    "post": ("seed", "model", "adapter", "post"),
}
EVAL_ROLES = ("eval_harmful", "over_refusal", "task_eval")
# Settings added after units were first stored enter a fingerprint only when set: a unit made before they existed
# (where they were, in effect, unset) is still found.
LATER_SETTINGS = {
    "evaluate": {
        "instruction_prompts": None,
        "pairwise_judge": None,
        "pairwise_judge_options": {},
        "unreadable_as_degenerate": False,
    }
}
# Evaluation settings a repair reads when it scores the task itself (recovery's δ rule), besides task_*; the
# pairwise judge only when one is set (a win-rate task), so that earlier post units keep their fingerprints.
POST_EVAL = ("batch_size", "mixed_precision", "pairwise_judge", "pairwise_judge_options")


def _unset_later(key: str, value: Any) -> bool:
    later = LATER_SETTINGS["evaluate"]
    return key in later and value == later[key]


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


@dataclass(frozen=True)
class Unit:
    kind: str  # align, finetune, post (a model) or eval (an evaluation point)
    key: str  # its name in the run: align, finetune-p0.1, post-p0.1, eval/base, eval/post-p0.1
    fingerprint: str
    upstream: str  # the fingerprint of the model it starts from (training) or evaluates (eval)
    point: str  # the stage whose model it makes or evaluates: base, align, finetune or post
    method: str | None
    harmful_ratio: float | None

    @property
    def point_key(self) -> str:
        """The evaluation point's name in results.json (eval/finetune-p0.1 → finetune-p0.1)."""
        return self.key.removeprefix("eval/")


class Fingerprints:
    """The fingerprint of each unit of one run, from its config, data plan and the extra data its methods load."""

    def __init__(self, run: RunConfig, plan: DataPlan, stage_extras: dict[str, list[str]]) -> None:
        self.run, self.plan, self.stage_extras = run, plan, stage_extras
        self._config = run.to_dict()

    def _data(self, stage: str, *roles: str) -> str:
        extras = [f"extra:{name}" for name in self.stage_extras.get(stage, [])]
        return self.plan.digest(*roles, *extras)

    def _benign(self) -> tuple[str, ...]:
        return ("alignment_benign",) if getattr(self.plan, "alignment_benign", None) else ()

    def base(self) -> str:
        return _hash("base", self._config["model"])

    def align(self) -> str:
        if self.run.align is None:
            return self.base()
        adapter = self._config["adapter"]
        return _hash(
            "align",
            self.run.fingerprint("seed", "model", "align"),
            {"topology": adapter["topology"], "align": adapter["align"]},  # not the fine-tuning LoRA
            # the benign half only when there is one: refusal-only units keep their fingerprints
            self._data("align", "alignment", "alignment_harmful", *self._benign()),
        )

    def finetune(self, p: float) -> str:
        from ftguard.attacks.base import get_attack

        attack = self._config["data"]["finetune"]["attack"]
        return _hash(
            "finetune",
            self.align(),
            self.run.fingerprint(*STAGE_SECTIONS["finetune"]),
            self._data("finetune", f"mix:{p}", "alignment", "alignment_harmful"),
            # a data-only attack is all in the upload's digest; one that reads the model is not
            *([attack] if get_attack(attack["name"]).needs_model else []),
        )

    def post(self, p: float) -> str:
        return _hash(
            "post",
            self.finetune(p),
            self.align(),
            self.run.fingerprint(*STAGE_SECTIONS["post"]),
            # Repairs that guard the task (recovery) score it with the evaluation's task settings.
            {
                k: v
                for k, v in self._config["evaluate"].items()
                if (k.startswith("task_") or k in POST_EVAL) and not _unset_later(k, v)
            },
            self._data("post", "task_validation", "alignment", "alignment_harmful"),
        )

    def eval(self, upstream: str) -> str:
        settings = {
            k: v for k, v in self._config["evaluate"].items() if k != "points" and not _unset_later(k, v)
        }
        # Judges whose fitted weights ship with ftguard (ftguard-judge): a re-fit must not reuse old verdicts.
        # Judges without a version add nothing, so archived evaluations keep their fingerprints.
        evaluate = self._config["evaluate"]
        versions = judge_versions(
            evaluate["judge"], evaluate["judge_options"], evaluate.get("extra_judges", [])
        )
        if versions:
            settings["judge_versions"] = versions
        # the same answers scored by match and by a judge's preference are two different evaluations
        if getattr(getattr(self.plan, "task", None), "metric", "label") == "winrate":
            settings["task_metric"] = "winrate"
        roles = (
            *EVAL_ROLES,
            *(("instruction_eval",) if getattr(self.plan, "instruction_eval", None) else ()),
        )
        return _hash("eval", upstream, settings, self.plan.digest(*roles))


@dataclass
class RunGraph:
    """A run prepared for work or costing: its data plan, the extra data sets each stage's method loaded (by
    name, in ``plan.extra``), and its units in the order a run makes them."""

    plan: DataPlan
    stage_extras: dict[str, list[str]]
    fingerprints: Fingerprints
    units: list[Unit]

    def unit(self, key: str) -> Unit:
        for unit in self.units:
            if unit.key == key:
                return unit
        raise KeyError(key)


def build_graph(resolved: ResolvedRun) -> RunGraph:
    """Load the run's data (the plan, then each method's own sets) and list its units. Loads no model."""
    run = resolved.config
    plan = build_data_plan(run, resolved.data_roles, resolved.attack)
    stage_extras: dict[str, list[str]] = {}
    for stage, method in resolved.methods.items():
        before = dict(plan.extra)
        method.prepare_data(plan, run, stage)
        stage_extras[stage] = sorted(k for k, v in plan.extra.items() if before.get(k) is not v)
    fingerprints = Fingerprints(run, plan, stage_extras)
    return RunGraph(plan, stage_extras, fingerprints, _units(resolved, fingerprints))


class ConfigDigests:
    """Stands in for the data plan's example hashes where the data are not on this machine (a dry run on a
    laptop for a cluster's data root): each role is keyed by the config that selects its examples. Units
    counted this way agree with the real run's for the usual disjoint layout, and never match a stored unit."""

    def __init__(self, run: RunConfig) -> None:
        d = run.to_dict()
        data, ft, ev = d["data"], d["data"]["finetune"], d["evaluate"]
        # The attack's share of a shared file moves the alignment records unless a reserve fixes it.
        attack = (
            ft["harmful_reserve"] if ft["harmful_reserve"] is not None else (ft["n"], ft["harmful_ratio"])
        )
        self._selects = {
            "alignment": (data["root"], data["alignment"], ft["harmful"], attack, d["seed"]),
            "task": (data["root"], ft["task"], ft["gsm8k_cot_suffix"], ft["n"], ft["harmful_ratio"]),
            "mix": (data["root"], ft, d["seed"]),
            "eval": (
                data["root"],
                ev["harmful_prompts"],
                ev["over_refusal_prompts"],
                ev.get("instruction_prompts"),
                ft["task"],
                ev["task_n"],
            ),
        }
        self._validation = (d["post"] or {}).get("validation_n")
        self._benign = data.get("alignment_benign")
        self.alignment_benign = bool(self._benign)  # read by Fingerprints like the plan's roles
        self.instruction_eval = bool(ev.get("instruction_prompts"))

    def digest(self, *roles: str) -> str:
        parts: list[Any] = ["config-digest"]
        for role in roles:
            if role.startswith("mix:"):
                parts.append((role, self._selects["mix"]))
            elif role == "alignment_benign":
                parts.append((role, self._selects["alignment"][0], self._benign))
            elif role in ("alignment", "alignment_harmful"):
                parts.append((role, self._selects["alignment"]))
            elif role == "task_validation":
                parts.append((role, self._selects["task"], self._validation))
            elif role in (*EVAL_ROLES, "instruction_eval"):
                parts.append((role, self._selects["eval"]))
            else:
                parts.append(role)
        return _hash(*parts)


def estimate_graph(resolved: ResolvedRun) -> tuple[list[Unit], str | None]:
    """The run's units for a dry run: from its data when they are here, else keyed by the config that selects
    them; the second value says which, when it is the config."""
    from ftguard.data.sources import local_only
    from ftguard.errors import DataNotFound

    try:
        with local_only():
            return build_graph(resolved).units, None
    except DataNotFound as exc:
        fingerprints = Fingerprints(resolved.config, ConfigDigests(resolved.config), {})  # type: ignore[arg-type]
        return _units(resolved, fingerprints), str(exc)


def _units(resolved: ResolvedRun, fp: Fingerprints) -> list[Unit]:
    run = resolved.config
    points = set(run.evaluate.points)
    method = {stage: getattr(run, stage).method for stage in resolved.stages}
    units: list[Unit] = []

    def add(kind: str, key: str, fingerprint: str, upstream: str, point: str, p: float | None) -> None:
        units.append(Unit(kind, key, fingerprint, upstream, point, method.get(point), p))
        if point in points:
            units.append(
                Unit("eval", f"eval/{key}", fp.eval(fingerprint), fingerprint, point, method.get(point), p)
            )

    if "base" in points:
        units.append(Unit("eval", "eval/base", fp.eval(fp.base()), fp.base(), "base", None, None))
    if run.align is not None:
        add("align", "align", fp.align(), fp.base(), "align", None)
    if run.finetune is not None:
        for key, p in finetune_keys(run).items():
            add("finetune", key, fp.finetune(p), fp.align(), "finetune", p)
            if run.post is not None:
                add("post", post_key_of(key), fp.post(p), fp.finetune(p), "post", p)
    return units
