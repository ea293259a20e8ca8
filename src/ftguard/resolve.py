"""A run resolved once, at the edge: the validated config plus one parsed method instance per stage.

``load_run`` reads the config (``base:`` chain, overrides, types), then checks every name the run uses through its
registry (methods and their args, judges and their options, the task, every data source) before any work. The
pipeline, the stages, the sweep (also ``--dry-run``), the estimate and the benches take the ``ResolvedRun`` and
never parse method args again; nothing below this module imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftguard.config import STAGES, RunConfig, SourceConfig, load_config
from ftguard.errors import FtguardError
from ftguard.schema import ConfigError

if TYPE_CHECKING:
    from ftguard.attacks.base import Attack
    from ftguard.methods.base import Method


@dataclass(frozen=True)
class ResolvedRun:
    config: RunConfig
    methods: dict[str, Method]  # stage → its method, for every stage the config does not set to null
    attack: Attack | None = (
        None  # what builds the upload (data.finetune.attack); None = the config's, parsed late
    )

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if s in self.methods)

    def method(self, stage: str) -> Method:
        if stage not in self.methods:
            raise FtguardError(f"the run has no {stage} stage ({stage}: null)")
        return self.methods[stage]

    @property
    def data_roles(self) -> frozenset[str]:
        """Data roles the later stages' methods need: the data plan loads the alignment data for them even when the
        run has no align stage (Lisa or EWC after a chat model's native alignment, recovery's harmful answers)."""
        return frozenset(
            role
            for stage in ("finetune", "post")
            if stage in self.methods
            for role in self.methods[stage].required_roles
        )


def load_run(name_or_path: str, overrides: list[str] | None = None) -> ResolvedRun:
    """Read a run config (file or packaged name), apply ``key=value`` overrides and resolve it."""
    return resolve_run(load_config(name_or_path, overrides))


def resolve_run(config: RunConfig) -> ResolvedRun:
    """Parse each stage's method args once and check every registered name the run uses."""
    from ftguard.attacks.base import get_attack
    from ftguard.methods.registry import get_method

    methods: dict[str, Method] = {}
    for stage in STAGES:
        stage_cfg = getattr(config, stage)
        if stage_cfg is None:
            continue
        try:
            method_cls = get_method(stage_cfg.method, stage)
        except FtguardError as exc:
            raise ConfigError(f"'{stage}.method': {exc}") from None
        methods[stage] = method_cls.from_args(stage_cfg.args, prefix=f"{stage}.args")
    for stage, method in methods.items():
        method.check_run_config(config, stage)
    spec = config.data.finetune.attack
    try:
        attack_cls = get_attack(spec.name)
    except FtguardError as exc:
        raise ConfigError(f"'data.finetune.attack.name': {exc}") from None
    resolved = ResolvedRun(config, methods, attack_cls.from_args(spec.args))
    _check_names(resolved)
    return resolved


def _check_names(resolved: ResolvedRun) -> None:
    from ftguard.data.sources import check_source
    from ftguard.data.tasks import get_task
    from ftguard.evaluation.judges import check_judge

    run = resolved.config
    ev = run.evaluate
    check_judge(ev.judge, ev.judge_options, "evaluate.judge")
    for i, name in enumerate(ev.extra_judges):
        check_judge(name, {}, f"evaluate.extra_judges[{i}]")
    for stage, method in resolved.methods.items():
        for key, (judge, options) in method.judges().items():
            check_judge(judge, options, f"{stage}.args.{key}")
    try:
        get_task(run.data.finetune.task, cot_suffix=run.data.finetune.gsm8k_cot_suffix)
    except FtguardError as exc:
        raise ConfigError(f"data.finetune.task: {exc}") from None
    for key, spec in _sources(resolved):
        try:
            check_source(spec.source, spec.split, spec.response)
        except FtguardError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def _sources(resolved: ResolvedRun) -> Iterator[tuple[str, SourceConfig]]:
    """Every data source the run names, with its config key: the data sections and any inside a method's args."""
    run = resolved.config
    yield "data.alignment", run.data.alignment
    yield "data.finetune.harmful", run.data.finetune.harmful
    yield "evaluate.harmful_prompts", run.evaluate.harmful_prompts
    if run.evaluate.over_refusal_prompts is not None:
        yield "evaluate.over_refusal_prompts", run.evaluate.over_refusal_prompts
    if run.evaluate.instruction_prompts is not None:
        yield "evaluate.instruction_prompts", run.evaluate.instruction_prompts
    for key, mix in (
        ("data.alignment_benign", run.data.alignment_benign),
        ("data.finetune.general", run.data.finetune.general),
    ):
        for i, source in enumerate(mix.sources if mix is not None else []):
            yield f"{key}.sources[{i}]", source
    for stage, method in resolved.methods.items():
        yield from _method_sources(method, f"{stage}.args")


def _method_sources(method: Method, key: str) -> Iterator[tuple[str, SourceConfig]]:
    yield from _nested_sources(method.config, key)
    for arg, inner in method.wrapped().items():
        yield from _method_sources(inner, f"{key}.{arg}")


def _nested_sources(value: Any, key: str) -> Iterator[tuple[str, SourceConfig]]:
    if isinstance(value, SourceConfig):
        yield key, value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _nested_sources(getattr(value, f.name), f"{key}.{f.name}")
