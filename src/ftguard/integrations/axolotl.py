"""ftguard's evaluation and release gate on the model an Axolotl job has just trained (``pip install ftguard[axolotl]``).

In the Axolotl YAML::

    plugins:
      - ftguard.integrations.axolotl.FtguardPlugin
    ftguard_config: my-eval.yaml     # an ftguard run config (file or packaged name): model.template, data, evaluate
    ftguard_policy: release          # optional: the release policy to gate by, as `ftguard gate --policy`
    ftguard_fail_on_block: true      # a blocked model fails the Axolotl job

The plug-in follows Axolotl's plug-in interface as its lm-eval plug-in does: ``get_input_args`` names a pydantic
model that Axolotl merges into its config schema (so the ``ftguard_*`` keys are validated with the rest), and the
work happens in ``post_train_unload(cfg)``, which Axolotl's ``do_train`` calls after ``train()`` has saved the model
and tokenizer to ``output_dir`` and the model has been deleted. What it runs is ftguard's, not a copy:

* the model in ``output_dir`` is evaluated as ``ftguard evaluate CONFIG --model DIR`` evaluates one
  (:func:`ftguard.pipeline.run.evaluate_model_dir`: the config's held-out harmful prompts, task and benign prompts,
  its judge), with ``model.name`` set to Axolotl's ``base_model``;
* ``results.json`` / ``results.md`` in ``ftguard_output_dir`` (default ``<output_dir>/ftguard``) hold it as the
  ``finetune`` point, so ``ftguard gate``, ``ftguard report`` and ``ftguard compare`` read them as any run's;
* with a policy, the verdict is ``ftguard gate DIR --policy POLICY --json verdict.json``
  (:func:`ftguard.policy.gate_with_policy`). A blocked model raises FtguardError when ``ftguard_fail_on_block``
  (the Axolotl command exits non-zero; the trained model stays in ``output_dir``), else is logged and recorded.

What Axolotl leaves, and how it is read:

* a LoRA/QLoRA job saves the adapter (``adapter_model.safetensors``): it is attached to ``base_model`` (loaded
  unquantized, in the ftguard config's ``model.dtype``, at ``revision_of_model``), merged as ftguard's own stages
  merge theirs, and evaluated from a temporary folder under ``ftguard_output_dir``, deleted afterwards;
* a full fine-tune is evaluated in place; one beside the ``adapter_config.json`` Axolotl pre-saves for any adapter
  (ReLoRA saves a merged model) through a temporary folder of links without it, which transformers would
  otherwise take for an adapter to load.

A policy rule relative to a point of the same run (``relative_to: aligned``, as in the packaged ``release``
policy) needs a baseline: ``base_model`` itself, the model the job fine-tuned, is then evaluated as the ``base``
point (``ftguard_baseline`` forces it on or off). Evaluations are kept under ``<ftguard_output_dir>/eval`` keyed by
the evaluated files (names, sizes, modification times) and the evaluation settings, so a re-trained model is
evaluated afresh and an unchanged base model is not (the baseline is read at the hub's current revision); the
results and verdict of an earlier job in the same folder are deleted first.

Under a multi-process launch Axolotl calls the hook on every rank after destroying the process group: rank 0
evaluates alone (ftguard sees a single process), the other ranks return. A launch that keeps the group (Ray) is
refused when the config is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftguard.errors import FtguardError
from ftguard.schema import check, from_dict

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # ftguard without Axolotl: the plug-in still imports, with the hooks it implements

    class BasePlugin:  # type: ignore[no-redef]
        def register(self, cfg: Any) -> None:
            """Called with the raw Axolotl config before it is validated."""

        def get_input_args(self) -> str | None:
            """Dotted path of a pydantic model merged into Axolotl's config schema."""

        def post_train_unload(self, cfg: Any) -> None:
            """Called after training, once the model is saved to ``output_dir`` and unloaded."""


log = logging.getLogger(__name__)
POINT = "finetune"  # the point the trained model is recorded as: the model a provider ships after fine-tuning
BASELINE = "base"
# What a distributed launcher sets; masked while rank 0 evaluates alone (the group is gone, the others returned).
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@dataclass
class PluginSettings:
    """The ``ftguard_*`` keys of the Axolotl config (field names are the YAML keys)."""

    ftguard_config: str = field(
        default="",
        metadata={
            "help": "ftguard run config (YAML file or packaged name) whose model.template, data and evaluate "
            "sections the evaluation uses; model.name is set to base_model"
        },
    )
    ftguard_policy: str | None = field(
        default=None,
        metadata={
            "help": "release policy (YAML file or packaged name, e.g. release) to gate the model by; "
            "none: evaluate only"
        },
    )
    ftguard_output_dir: str | None = field(
        default=None,
        metadata={"help": "where results, the verdict and the evaluation go; default <output_dir>/ftguard"},
    )
    ftguard_fail_on_block: bool = field(
        default=True, metadata={"help": "fail the Axolotl job when the policy blocks the model"}
    )
    ftguard_set: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=VALUE overrides of the ftguard config, as `ftguard evaluate --set`"},
    )
    ftguard_baseline: bool | None = field(
        default=None,
        metadata={
            "help": "also evaluate base_model as the base point; default: when a policy rule is relative to "
            "a point of this run (relative_to: aligned / base)"
        },
    )

    def __post_init__(self) -> None:
        check(
            bool(self.ftguard_config.strip()),
            "ftguard_config",
            "is required: an ftguard run config (YAML file or packaged name, see `ftguard configs`) whose "
            "evaluate section is used",
        )


def settings_of(cfg: Any) -> PluginSettings:
    """The plug-in's keys of an Axolotl config (raw or validated); a wrong one raises ConfigError naming it.

    Every ``ftguard_*`` key is read, so that a misspelt one fails: Axolotl drops keys its schema does not know,
    and a misspelt ``ftguard_policy`` would switch the gate off without a word."""
    data = {k: v for k, v in cfg.items() if str(k).startswith("ftguard_") and v is not None}
    return from_dict(PluginSettings, data)


def _pydantic_args() -> type:
    """The pydantic model of the same keys, for Axolotl's schema: built from PluginSettings, so one list holds them.
    Types only; the values are checked by ``register`` (one-line errors, before training)."""
    from pydantic import Field, create_model

    hints = typing.get_type_hints(PluginSettings)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(PluginSettings):
        missing = f.default is dataclasses.MISSING
        default = {"default_factory": f.default_factory} if missing else {"default": f.default}
        # A key left empty in the YAML is null, which settings_of reads as the default.
        fields[f.name] = (hints[f.name] | None, Field(**default, description=f.metadata["help"]))
    return create_model("FtguardArgs", __module__=__name__, **fields)


def __getattr__(name: str) -> Any:
    # Axolotl imports the args model by the dotted path get_input_args() returns; built on first use so that the
    # module imports without pydantic (a dependency of Axolotl, not of ftguard).
    if name == "FtguardArgs":
        model = globals()[name] = _pydantic_args()
        return model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FtguardPlugin(BasePlugin):
    """Axolotl plug-in: evaluate the trained model with ftguard and gate it by a release policy."""

    def get_input_args(self) -> str:
        return f"{__name__}.FtguardArgs"

    def register(self, cfg: Any) -> None:
        # Axolotl calls this with the raw config before validating it: a typo in a path or key fails here, not
        # after hours of training.
        if cfg.get("use_ray"):
            raise FtguardError(
                "ftguard plug-in: Ray launches keep their process group at post_train_unload, which this plug-in "
                "does not join; drop the plug-in and run `ftguard evaluate CONFIG --model OUTPUT_DIR` after the job"
            )
        settings = settings_of(cfg)
        _resolve(settings, cfg)
        if settings.ftguard_policy:
            from ftguard.policy import load_policy

            load_policy(settings.ftguard_policy)

    def post_train_unload(self, cfg: Any) -> None:
        evaluate_and_gate(cfg)


def evaluate_and_gate(cfg: Any) -> dict[str, Any] | None:
    """What the hook does; returns the results written (None on a rank other than 0). Raises FtguardError when
    the policy blocks the model and ``ftguard_fail_on_block`` is set."""
    import torch.distributed as dist

    settings = settings_of(cfg)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise FtguardError(
            "ftguard plug-in: the process group is still up at post_train_unload; run `ftguard evaluate CONFIG "
            "--model OUTPUT_DIR` after the job instead"
        )
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0:
        return None
    with _single_process():
        return _evaluate_and_gate(cfg, settings)


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in LAUNCH_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _resolve(settings: PluginSettings, cfg: Any):
    """The ftguard run: the config, its output_dir and model.name set from Axolotl's, then ``ftguard_set``."""
    from ftguard.config import apply_overrides, config_from_dict, read_config_data, set_keys
    from ftguard.resolve import resolve_run

    keys = [(["output_dir"], str(_output_dir(settings, cfg)), "ftguard_output_dir")]
    if cfg.get("base_model"):
        keys.append((["model", "name"], str(cfg.get("base_model")), "base_model"))
    if cfg.get("trust_remote_code"):
        keys.append((["model", "trust_remote_code"], True, "trust_remote_code"))
    data = set_keys(read_config_data(settings.ftguard_config), keys)
    return resolve_run(config_from_dict(apply_overrides(data, settings.ftguard_set)))


def _output_dir(settings: PluginSettings, cfg: Any) -> Path:
    if settings.ftguard_output_dir:
        return Path(settings.ftguard_output_dir)
    return Path(cfg.get("output_dir") or "./model-out") / "ftguard"


def files_digest(folder: str | Path) -> str:
    """Names, sizes and modification times of a folder's files (not its subfolders: Axolotl's checkpoints): a
    model saved again has new times, so its evaluation is not mistaken for the previous model's."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        stat = f.stat()
        h.update(f"{f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _trained_model(cfg: Any, resolved: Any, scratch: Path) -> Iterator[str]:
    """The folder to evaluate: Axolotl's output_dir, or its adapter merged into base_model in a scratch folder."""
    folder = Path(str(cfg.get("output_dir") or "./model-out"))
    if not (folder / "adapter_model.safetensors").is_file():
        if not (folder / "config.json").is_file():
            raise FtguardError(
                f"ftguard plug-in: {folder} (output_dir) holds no saved model (no config.json or "
                "adapter_model.safetensors): did the training save one?"
            )
        if not (folder / "adapter_config.json").is_file():
            yield str(folder)  # ftguard's loader says what is wrong with the weights, if anything
            return
        # Axolotl writes adapter_config.json before training for any adapter, also when it then saves a merged
        # model (ReLoRA); transformers would look for the adapter's weights. The model's files without it:
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".model-", dir=scratch) as tmp:
            for f in folder.iterdir():
                if f.is_file() and f.name != "adapter_config.json":
                    os.symlink(f.resolve(), Path(tmp) / f.name)
            yield tmp
        return
    from ftguard.models import load_lora, load_model, load_tokenizer, merge_lora

    mc = resolved.config.model
    base = load_model(
        str(cfg.get("base_model")),
        dtype=mc.dtype,
        trust_remote_code=mc.trust_remote_code,
        revision=cfg.get("revision_of_model"),
    )
    merged = merge_lora(load_lora(base, folder, trainable=False))
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=scratch) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(str(folder), trust_remote_code=mc.trust_remote_code).save_pretrained(tmp)
        del base, merged
        yield tmp


def _needs_baseline(policy: str | None) -> bool:
    if not policy:
        return False
    from ftguard.policy import load_policy

    return any(isinstance(rule.relative_to, str) for rule in load_policy(policy).policy.rules)


def _evaluate_and_gate(cfg: Any, settings: PluginSettings) -> dict[str, Any]:
    import torch

    from ftguard.pipeline.results import git_revision, library_versions, write_results
    from ftguard.pipeline.run import evaluate_model_dir

    resolved = _resolve(settings, cfg)
    run = resolved.config
    out = run.out_dir
    for name in ("results.json", "results.md", "verdict.json"):  # another model's, if the folder is reused
        (out / name).unlink(missing_ok=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the deleted training model left cached
    source = Path(str(cfg.get("output_dir") or "./model-out"))
    digest = files_digest(source)
    # The evaluation settings are in the key too: a later job that changes them (into the same folder) gets a
    # new evaluation instead of the refusal of a unit made by another config.
    settings_hash = run.fingerprint("evaluate", "data", "model")[:8]
    with _trained_model(cfg, resolved, out) as model_dir:
        key = f"axolotl-{digest}-{settings_hash}"
        points = {POINT: evaluate_model_dir(resolved, model_dir, key=key)}
    baseline = settings.ftguard_baseline
    if baseline is None:
        baseline = _needs_baseline(settings.ftguard_policy)
    if baseline:
        base = str(cfg.get("base_model"))
        name = files_digest(base) if Path(base).is_dir() else base.replace("/", "--")
        key = f"base-{name}-{settings_hash}"
        points = {BASELINE: evaluate_model_dir(resolved, base, key=key), **points}
    results = {
        "ftguard_version": library_versions()["ftguard"],
        "complete": True,
        "name": f"axolotl {source.resolve().name}",
        "description": run.description,
        "model": run.model.name,
        "seed": run.seed,
        "config_hash": run.fingerprint(),
        "judge": run.evaluate.judge,
        "extra_judges": list(run.evaluate.extra_judges),
        "versions": library_versions(),
        "git": git_revision(),
        # No "config": the model was trained by Axolotl, not by this run config's stages.
        "ftguard_config": run.to_dict(),
        "axolotl": {
            "output_dir": str(source.resolve()),
            "base_model": cfg.get("base_model"),
            "adapter": cfg.get("adapter"),
            "files_digest": digest,
        },
        "stages": {
            point: {
                "stage": point,
                "method": "axolotl" if point == POINT else None,
                "harmful_ratio": None,
                **metrics,
                "judge": run.evaluate.judge,
                "model": run.model.name,
                "seed": run.seed,
                "config_hash": run.fingerprint(),
            }
            for point, metrics in points.items()
        },
    }
    write_results(out, results)
    log.info("ftguard: results in %s", out / "results.json")
    if settings.ftguard_policy:
        _gate(out, settings)
    return results


def _gate(out: Path, settings: PluginSettings) -> None:
    from ftguard.policy import gate_with_policy

    verdict_file = out / "verdict.json"
    code = gate_with_policy(str(out), str(settings.ftguard_policy), str(verdict_file))
    if code == 0:
        return
    verdict = json.loads(verdict_file.read_text(encoding="utf-8"))
    failed = [
        f"{r['rule']} at {r['point'] or '–'}: {r['reason']}"
        for r in verdict["rows"]
        if r["verdict"] == "fail"
    ]
    why = "; ".join(failed) or "the results are incomplete"
    message = (
        f"ftguard release policy {settings.ftguard_policy} blocks the model: {why} (verdict: {verdict_file})"
    )
    if settings.ftguard_fail_on_block:
        raise FtguardError(message)
    log.warning("%s; ftguard_fail_on_block is false: the job goes on", message)
