"""The data plan: every data role of a run, built and checked once before any training.

Roles: alignment (prompt → refusal), alignment_harmful (the same prompts → harmful answers, the harmful
set of Booster/RepNoise), the attack pool (prompt → harmful answer, for the user's mix), the benign
task (train and eval), and held-out harmful prompts for HS. Alignment, attack and evaluation prompts must be
disjoint; when alignment and attack come from the same file, the attack takes the first records and the
alignment the following ones (Booster's layout: harmful records 1…p·n, alignment records from 5001; see
docs/methods.md, Alignment data and User data).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftguard.attacks.base import Attack, UploadPools, attack_from_spec
from ftguard.config import RunConfig, SourceConfig
from ftguard.data.benign import build_benign_mix, interleave
from ftguard.data.example import Example
from ftguard.data.mix import check_disjoint
from ftguard.data.sources import PROMPT_ONLY, file_sha256, load_examples, source_files
from ftguard.data.tasks import Task, get_task
from ftguard.data.upload import read_upload
from ftguard.errors import FtguardError

log = logging.getLogger(__name__)

ROLE_HINTS = {
    "alignment_harmful": "give data.alignment and data.finetune.harmful the same source and split, with "
    "response: safe and response: unsafe (harmful answers of the alignment prompts; docs/methods.md, "
    "Alignment data)",
}


@dataclass
class DataPlan:
    task: Task
    alignment: list[Example] = field(default_factory=list)
    alignment_harmful: list[Example] = field(default_factory=list)
    # helpful-and-harmless alignment's benign half, and the general instructions of the upload
    alignment_benign: list[Example] = field(default_factory=list)
    finetune_general: list[Example] = field(default_factory=list)
    attack_pool: list[Example] = field(default_factory=list)
    task_eval: list[Example] = field(default_factory=list)
    eval_harmful: list[Example] = field(default_factory=list)
    instruction_eval: list[Example] = field(default_factory=list)  # ordinary benign instructions (AlpacaEval)
    over_refusal: list[Example] = field(default_factory=list)  # benign prompts (XSTest safe) for over-refusal
    task_validation: list[Example] = field(
        default_factory=list
    )  # task train examples outside every upload (post stage)
    mixes: dict[float, list[Example]] = field(default_factory=dict)
    mix_reports: dict[float, dict[str, Any]] = field(default_factory=dict)  # the attack's report per ratio
    sources: dict[str, dict[str, str]] = field(default_factory=dict)
    extra: dict[str, list[Example]] = field(default_factory=dict)  # method-specific sets (load_extra)
    root: str = "bundled"
    seed: int = 0  # the run's seed, for methods that reshuffle data (e.g. Vlguard's mix)

    def align_examples(self) -> list[Example]:
        """What the align stage trains on: the refusals, with the benign examples shuffled in when configured."""
        return (
            interleave(self.alignment, self.alignment_benign, self.seed)
            if self.alignment_benign
            else self.alignment
        )

    def require(self, roles: tuple[str, ...], who: str) -> None:
        for role in roles:
            if not getattr(self, role):
                raise FtguardError(
                    f"{who} needs the data role '{role}', which is empty: {ROLE_HINTS.get(role, 'check data')}"
                )

    def load_extra(self, name: str, spec: SourceConfig, key: str) -> list[Example]:
        """Load a method's own data set (e.g. Lisa's alignment pool from another source), deduplicated by prompt
        and checked disjoint from the attack and evaluation prompts; recorded in the report with its hashes."""
        examples = _load(spec, self.root, spec.response, key)
        examples = [examples[i] for i in _dedup(examples)]
        if spec.n is not None:
            if spec.n > len(examples):
                raise FtguardError(
                    f"{key}.n = {spec.n} but {spec.source}/{spec.split} has {len(examples)} records"
                )
            examples = examples[: spec.n]
        if not examples:
            raise FtguardError(f"{key}: {spec.source}/{spec.split} gave no examples")
        check_disjoint({name: examples, "attack": self.attack_pool, "evaluation": self.eval_harmful})
        self.extra[name] = examples
        self.sources[name] = _hashes(spec, self.root)
        return examples

    def digest(self, *roles: str) -> str:
        """Hash of the examples of ``roles`` (a role name, ``mix:<p>`` or ``extra:<name>``): what a unit trained
        or evaluated on, so that units are shared exactly when their data are the same."""
        h = hashlib.sha256()
        for role in roles:
            if role.startswith("mix:"):
                examples = self.mixes[float(role[4:])]
            elif role.startswith("extra:"):
                examples = self.extra[role[6:]]
            else:
                examples = getattr(self, role)
            h.update(role.encode() + b"\0")
            for ex in examples:
                fields = [ex.instruction, ex.input, ex.output, *([ex.messages] if ex.messages else [])]
                h.update(json.dumps(fields).encode() + b"\n")
        return h.hexdigest()[:16]

    def report(self) -> dict[str, Any]:
        """Counts and source hashes, recorded in results.json."""
        return {
            "task": self.task.name,
            "counts": {
                "alignment": len(self.alignment),
                "alignment_harmful": len(self.alignment_harmful),
                # only when configured: the reports of refusal-only runs stay as they were
                **({"alignment_benign": len(self.alignment_benign)} if self.alignment_benign else {}),
                **({"finetune_general": len(self.finetune_general)} if self.finetune_general else {}),
                **({"instruction_eval": len(self.instruction_eval)} if self.instruction_eval else {}),
                "attack_pool": len(self.attack_pool),
                "task_eval": len(self.task_eval),
                "eval_harmful": len(self.eval_harmful),
                "over_refusal": len(self.over_refusal),
                "task_validation": len(self.task_validation),
                **{name: len(examples) for name, examples in self.extra.items()},
            },
            "mixes": {f"{p:g}": report for p, report in self.mix_reports.items()},
            "sources": self.sources,
        }


def _load(spec: SourceConfig, root: str, response: str | None, key: str) -> list[Example]:
    try:
        return load_examples(spec.source, split=spec.split, root=root, response=response, path=spec.path)
    except FtguardError as exc:
        raise type(exc)(f"{key}: {exc}") from None  # the kind survives (DataNotFound)


def _eval_prompts(spec: SourceConfig, root: str, key: str) -> list[Example]:
    """The first ``spec.n`` prompts (all when null). Evaluation needs prompts only: a user's file of harmful
    prompts must not be asked for answers."""
    prompts = _load(spec, root, PROMPT_ONLY, key)
    if spec.n is not None and spec.n > len(prompts):
        raise FtguardError(
            f"{key}.n = {spec.n} but {spec.source}/{spec.split} has {len(prompts)} prompts: lower it, or set it to "
            "null (all)"
        )
    return prompts if spec.n is None else prompts[: spec.n]


def _dedup(examples: list[Example]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, ex in enumerate(examples):
        if ex.prompt_key not in seen:
            seen.add(ex.prompt_key)
            keep.append(i)
    return keep


def _hashes(spec: SourceConfig, root: str) -> dict[str, str]:
    # Hub sources have no local file to hash; their id and split are in the config.
    files = source_files(spec.source, spec.split, root, path=spec.path)
    return {str(f): file_sha256(f) for f in files}


def _same_file(a: SourceConfig, b: SourceConfig) -> bool:
    return (a.source, a.split, a.path) == (b.source, b.split, b.path)


def _require_answers(examples: list[Example], spec: SourceConfig, key: str, field: str) -> None:
    """Training roles need answers: a prompt-only source (response: prompt, xstest...) would otherwise train on
    an empty target, EOS alone, without a word of warning."""
    empty = sum(not ex.output for ex in examples)
    if empty:
        raise FtguardError(
            f"{key}: {empty} of {len(examples)} records of {spec.source}/{spec.split} have no answer "
            f"(response: {spec.response or 'default'}) but training needs one: set {key}.response to an answer "
            f"field ({field} for BeaverTails-style sources, output for jsonl) or use a source with answers"
        )


def build_data_plan(run: RunConfig, roles: Collection[str], attack: Attack | None = None) -> DataPlan:
    """Every data role of ``run``. ``roles`` are those the later stages' methods declare
    (``ResolvedRun.data_roles``): finetune-stage methods such as Lisa or EWC use the alignment data even when the
    run has no align stage, and so do repairs that read the harmful answers of the alignment prompts (recovery,
    Antidote); with ``align: null`` the base model is the aligned one (a chat model's native alignment).
    ``attack`` builds the upload of each ratio (default: the one ``data.finetune.attack`` names)."""
    data, root = run.data, run.data.root
    task = get_task(data.finetune.task, cot_suffix=data.finetune.gsm8k_cot_suffix)
    plan = DataPlan(task=task, root=root, seed=run.seed)

    ft = data.finetune
    attack = attack if attack is not None else attack_from_spec(ft.attack)
    ratios = ft.ratios if run.finetune is not None else []
    upload = ft.upload if ratios else None
    if upload is not None:
        task = upload_task(upload.path, upload.score)
        plan.task = task
    need_attack = max((attack.harmful_needed(ft.n, p) for p in ratios), default=0)
    n_general = ft.general.n if ft.general is not None and ratios else 0
    places = min((attack.benign_needed(ft.n, p) for p in ratios), default=0)
    if n_general > places:
        raise FtguardError(
            f"data.finetune.general.n = {n_general} but the upload has {places} benign places at the largest ratio "
            "(n − round(p·n)): lower it, or raise data.finetune.n"
        )
    need_benign = max(max((attack.benign_needed(ft.n, p) for p in ratios), default=0) - n_general, 0)
    if upload is not None:
        need_attack = need_benign = 0  # the customer's rows are the whole upload
    if ft.harmful.n is not None and ft.harmful.n < need_attack:
        raise FtguardError(
            f"data.finetune.harmful.n = {ft.harmful.n} but the mix needs {need_attack} harmful samples: raise it or lower harmful_ratio"
        )

    align_spec = data.alignment
    need_alignment = run.align is not None or bool({"alignment", "alignment_harmful"} & set(roles))
    if need_alignment and _same_file(align_spec, ft.harmful):
        # One file serves both roles: split its records so that no prompt is in both.
        safe = _load(align_spec, root, align_spec.response, "data.alignment")
        unsafe = _load(ft.harmful, root, ft.harmful.response, "data.finetune.harmful")
        keep = _dedup(safe)
        if need_attack > len(keep):
            raise FtguardError(
                f"the mix needs {need_attack} harmful samples (round(p·n)) but {ft.harmful.source}/{ft.harmful.split} "
                f"has {len(keep)} records: lower data.finetune.n or data.finetune.harmful_ratio"
            )
        reserve = need_attack if ft.harmful_reserve is None else ft.harmful_reserve
        if reserve < need_attack:
            raise FtguardError(
                f"data.finetune.harmful_reserve = {reserve} but the mix needs {need_attack} harmful samples "
                "(round(p·n)): raise the reserve or lower data.finetune.n or harmful_ratio"
            )
        if reserve > len(keep):
            raise FtguardError(
                f"data.finetune.harmful_reserve = {reserve} but {ft.harmful.source}/{ft.harmful.split} has "
                f"{len(keep)} records: lower it"
            )
        attack_idx, rest = keep[:need_attack], keep[reserve:]
        n_align = len(rest) if align_spec.n is None else align_spec.n
        if n_align > len(rest):
            raise FtguardError(
                f"data.alignment.n = {n_align} but {align_spec.source}/{align_spec.split} has only {len(rest)} records "
                f"left after the {reserve} kept for the attack: lower data.alignment.n or the attack size"
            )
        align_idx = rest[:n_align]
        plan.alignment = [safe[i] for i in align_idx]
        plan.alignment_harmful = [unsafe[i] for i in align_idx if unsafe[i].output]
        plan.attack_pool = [unsafe[i] for i in attack_idx]
    else:
        if need_alignment:
            pool = _load(align_spec, root, align_spec.response, "data.alignment")
            n_align = len(pool) if align_spec.n is None else align_spec.n
            if n_align > len(pool):
                raise FtguardError(
                    f"data.alignment.n = {n_align} but {align_spec.source}/{align_spec.split} has {len(pool)} records: "
                    "lower it, or set it to null (all)"
                )
            plan.alignment = pool[:n_align]
        if need_attack:
            harmful = _load(ft.harmful, root, ft.harmful.response, "data.finetune.harmful")
            plan.attack_pool = [harmful[i] for i in _dedup(harmful)][:need_attack]
    if need_attack > len(plan.attack_pool):
        raise FtguardError(
            f"the mix needs {need_attack} harmful samples (round(p·n)) but {ft.harmful.source}/{ft.harmful.split} "
            f"gives {len(plan.attack_pool)}: lower data.finetune.n or data.finetune.harmful_ratio"
        )
    if need_alignment:
        _require_answers(plan.alignment, align_spec, "data.alignment", "safe")
    if run.align is not None and data.alignment_benign is not None:
        plan.alignment_benign = build_benign_mix(data.alignment_benign, root)
    if n_general:
        # After the alignment's benign rows when both draw from one source: no prompt is trained on twice.
        taken = {ex.prompt_key for ex in plan.alignment_benign}
        plan.finetune_general = build_benign_mix(ft.general, root, "data.finetune.general", exclude=taken)
    _require_answers(plan.attack_pool, ft.harmful, "data.finetune.harmful", "unsafe")

    ev = run.evaluate.harmful_prompts
    plan.eval_harmful = _eval_prompts(ev, root, "evaluate.harmful_prompts")
    # Roles named with their config keys, so that the error says which files to fix.
    check_disjoint(
        {
            "alignment (data.alignment)": plan.alignment,
            "benign alignment (data.alignment_benign)": plan.alignment_benign,
            "attack (data.finetune.harmful)": plan.attack_pool,
            "evaluation (evaluate.harmful_prompts)": plan.eval_harmful,
        }
    )
    benign = run.evaluate.over_refusal_prompts
    if benign is not None:
        plan.over_refusal = _eval_prompts(benign, root, "evaluate.over_refusal_prompts")
    if run.evaluate.instruction_prompts is not None:
        plan.instruction_eval = _eval_prompts(
            run.evaluate.instruction_prompts, root, "evaluate.instruction_prompts"
        )
    # A benign prompt the model was trained to answer says nothing about how often it refuses such prompts.
    for role, examples in (
        ("benign alignment (data.alignment_benign)", plan.alignment_benign),
        ("general instructions (data.finetune.general)", plan.finetune_general),
    ):
        check_disjoint({role: examples, "over-refusal (evaluate.over_refusal_prompts)": plan.over_refusal})
        check_disjoint({role: examples, "instructions (evaluate.instruction_prompts)": plan.instruction_eval})
        check_disjoint({role: examples, "evaluation (evaluate.harmful_prompts)": plan.eval_harmful})

    n_validation = run.post.validation_n if run.post is not None else 0
    # an upload has no task pool of ftguard's to hold validation rows back from
    wanted = need_benign + n_validation if upload is None else 0
    loaded = task.train_examples(root, n=wanted) if wanted else []
    task_train, plan.task_validation = loaded[:need_benign], loaded[need_benign:]
    # "Up to" n, as the papers' FA sets (SST2 has 872 validation rows under Booster's "1000";
    # docs/methods.md, Finetune accuracy).
    task_eval = task.eval_examples(root) if upload is None else _upload_eval(upload)
    n_eval = run.evaluate.task_n
    if n_eval is not None and n_eval > len(task_eval):
        log.warning(
            "evaluate.task_n = %d but %s has %d evaluation examples under '%s': FA uses all %d",
            n_eval,
            task.name,
            len(task_eval),
            root,
            len(task_eval),
        )
    plan.task_eval = task_eval if n_eval is None else task_eval[:n_eval]
    check_disjoint(
        {"task train": task_train, "task validation": plan.task_validation, "task eval": plan.task_eval}
    )
    # a task drawn from a general source (alpaca_eval trains on Dolly) must not repeat the other benign roles' rows
    for role, examples in (
        ("benign alignment (data.alignment_benign)", plan.alignment_benign),
        ("general instructions (data.finetune.general)", plan.finetune_general),
    ):
        check_disjoint({role: examples, "task train": task_train + plan.task_validation})
    # AlpacaEval is both a task (items 701-804) and a common source of instruction-refusal prompts
    check_disjoint(
        {"task eval": plan.task_eval, "instructions (evaluate.instruction_prompts)": plan.instruction_eval}
    )
    pools = UploadPools(
        benign=plan.finetune_general + task_train, harmful=plan.attack_pool, n=ft.n, n_general=n_general
    )
    if upload is not None:
        rows, report = read_upload(upload.path, upload.format)
        plan.mixes[0.0], plan.mix_reports[0.0] = rows, {**report, "upload": True}
        ratios = []
    for p in ratios:
        built = attack.build(pools, p, run.seed)
        if not built.examples:
            raise FtguardError(
                f"data.finetune.attack '{attack.name}' built an empty upload at p = {p:g}: check its args and "
                "data.finetune.n"
            )
        plan.mixes[p], plan.mix_reports[p] = built.examples, built.report

    specs = {"alignment": align_spec, "harmful": ft.harmful, "eval_harmful": ev}
    if benign is not None:
        specs["over_refusal"] = benign
    plan.sources = {role: _hashes(spec, root) for role, spec in specs.items()}
    plan.sources["task"] = {str(f): file_sha256(f) for f in task.files(root)}
    if ft.upload is not None and run.finetune is not None:
        files = [ft.upload.path, *([ft.upload.eval_path] if ft.upload.eval_path else [])]
        plan.sources["upload"] = {f: file_sha256(Path(f)) for f in files}
    return plan


def upload_task(path: str, score: str = "reference") -> Task:
    """The customer's task: answers scored against the reference answers of their held-out rows, by match or by
    a judge's preference (``data.finetune.upload.score``)."""
    return Task(name=f"upload:{Path(path).name}", metric="winrate" if score == "winrate" else "label")


def _upload_eval(upload: Any) -> list[Example]:
    if upload.eval_path is None:
        return []
    rows, _ = read_upload(upload.eval_path, upload.format)
    return rows
