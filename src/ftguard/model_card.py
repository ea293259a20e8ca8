"""Hugging Face model cards for the models a run saves, and ``ftguard run --push-to-hub``.

Each evaluated ``model/`` folder (align, finetune, post) gets a ``README.md``: YAML front matter built with
``huggingface_hub.ModelCardData`` and ``EvalResult`` (so ``ModelCard.load(path).data.eval_results`` reads the
safety evaluation back), and a short body. A card is written when the evaluation of its point completes, from
that point's entry of results.json: the model exists before its numbers do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ftguard.errors import FtguardError

log = logging.getLogger(__name__)

CARD = "README.md"
TOKEN_ENV = "HF_TOKEN"
STAGE_ORDER = ("align", "finetune", "post")
# ftguard's built-in model names are not hub ids: the hub model their weights come from, and its license as
# stated on that model's hub page. ``tiny`` is a random Llama built in code: no base model, no license.
BUILTIN_BASES = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "gemma3-270m": ("google/gemma-3-270m", "gemma"),
}
# (metric key in results.json, label in the card, what it measures, which evaluation set)
METRICS = (
    ("harmful_score", "HS (%)", "harmful", "harmful_prompts"),
    ("harmful_score_plus", "HS+ (%)", "harmful", "harmful_prompts"),
    ("harmful_score_triggered", "HS, attacker's trigger (%)", "harmful", "harmful_prompts"),
    ("finetune_accuracy", "FA (%)", "task", None),
    ("over_refusal", "Over-refusal (%)", "refusal", "over_refusal_prompts"),
    ("instruction_refusal", "Instruction refusal (%)", "refusal", "instruction_prompts"),
)
TASK_NAMES = {
    "harmful": "Harmfulness on held-out harmful prompts",
    "task": "Fine-tuning task accuracy",
    "refusal": "Refusal of benign prompts",
}
SOURCE_ROLES = {"harmful_prompts": "eval_harmful", "over_refusal_prompts": "over_refusal"}


def _base_and_license(model_name: str) -> tuple[str | None, str | None]:
    """The hub id the run started from and its license, when known (never looked up on the network)."""
    if model_name in BUILTIN_BASES:
        return BUILTIN_BASES[model_name]
    if model_name == "tiny" or Path(model_name).expanduser().exists():
        return None, None  # a local folder is no hub id: base_model would point nowhere
    try:
        from huggingface_hub import ModelCard, try_to_load_from_cache

        cached = try_to_load_from_cache(model_name, CARD)
        license_ = ModelCard.load(cached).data.license if isinstance(cached, str) else None
    except Exception:  # a missing or malformed cached card only means the license is unknown
        license_ = None
    return model_name, license_


def _short_hashes(sources: dict[str, str]) -> dict[str, str]:
    # The run's absolute paths would publish the machine's layout: keep the data set folder and file name.
    return {"/".join(Path(path).parts[-2:]): digest for path, digest in sources.items()}


def _data_report(data: dict[str, Any]) -> dict[str, Any]:
    """results.json's data report (counts, mixes, file hashes) with the hashes' paths shortened."""
    sources = {role: _short_hashes(hashes) for role, hashes in data.get("sources", {}).items()}
    return {**data, "sources": sources}


def _eval_results(results: dict[str, Any], entry: dict[str, Any]) -> list[Any]:
    from huggingface_hub import EvalResult

    evaluate = results["config"]["evaluate"]
    sources = results.get("data", {}).get("sources", {})
    judge = results.get("judge") or {"name": evaluate["judge"]}
    detector = entry.get("refusal_detector")
    out = []
    for key, label, kind, spec_key in METRICS:
        if entry.get(key) is None:
            continue
        if spec_key is None:  # the fine-tuning task's own test set
            name = entry.get("task") or results.get("data", {}).get("task", "task")
            spec, hashes = (
                {"source": name, "split": "test", "n": entry.get("n_task")},
                sources.get("task", {}),
            )
        else:
            spec = evaluate.get(spec_key) or {}
            hashes = sources.get(SOURCE_ROLES.get(spec_key, ""), {})
        k, n = entry.get("counts", {}).get(key, [None, None])
        args: dict[str, Any] = {"ci95": entry.get("intervals", {}).get(key), "k": k, "n": n}
        if kind == "harmful":
            args["judge"] = judge
        elif kind == "refusal":
            args["refusal_detector"] = detector
        else:
            args["rule"] = entry.get("task_rule")
            if entry.get("finetune_accuracy_judge"):  # a win rate: the judge is part of the number
                args["judge"] = entry["finetune_accuracy_judge"]
        win_rate = kind == "task" and entry.get("task_rule") == "winrate"
        out.append(
            EvalResult(
                task_type="text-generation",
                task_name="Fine-tuning task win rate against reference answers"
                if win_rate
                else TASK_NAMES[kind],
                dataset_type=str(spec.get("source")),
                dataset_name=f"{spec.get('source')} ({spec.get('split')}, n={spec.get('n') or 'all'})",
                dataset_split=spec.get("split"),
                dataset_args={"sha256": _short_hashes(hashes)} if hashes else None,
                metric_type=key,
                metric_name=label,
                metric_value=entry[key],
                metric_config={"harmful": judge["name"], "refusal": (detector or {}).get("name")}.get(
                    kind, entry.get("task_rule")
                ),
                metric_args=args,
            )
        )
    return out


def _defense(results: dict[str, Any], stage: str) -> dict[str, Any]:
    """The methods that made this model: every configured stage up to and including ``stage``."""
    config = results["config"]
    upto = STAGE_ORDER[: STAGE_ORDER.index(stage) + 1]
    return {
        s: {"method": config[s]["method"], "args": config[s].get("args", {})} for s in upto if config.get(s)
    }


def _caveat(judge_name: str) -> str:
    if judge_name == "beaver-dam":
        return (
            "HS was judged by beaver-dam-7b, the papers' judge; the prompts and sample sizes are this run's."
        )
    if judge_name == "ftguard-judge":
        return (
            "HS was judged by **ftguard-judge**, an offline MiniLM classifier, not the papers' beaver-dam-7b: "
            "these numbers are not comparable to the papers' (docs/judges.md gives its accuracy)."
        )
    return (
        f"HS was judged by **{judge_name}**, not the papers' beaver-dam-7b: these numbers are not comparable "
        "to the papers'."
    )


def _table(entry: dict[str, Any]) -> str:
    rows = ["| metric | value | 95% interval | k / n |", "|---|---|---|---|"]
    for key, label, _, _ in METRICS:
        if entry.get(key) is None:
            continue
        lo, hi = entry.get("intervals", {}).get(key) or (float("nan"), float("nan"))
        k, n = entry.get("counts", {}).get(key, ["?", "?"])
        rows.append(f"| {label} | {entry[key]:.1f} | [{lo:.1f}, {hi:.1f}] | {k} / {n} |")
    return "\n".join(rows)


def build_model_card(results: dict[str, Any], point_key: str) -> Any:
    """The card of the model evaluated as ``point_key`` (a key of results.json's ``stages``)."""
    from huggingface_hub import ModelCard, ModelCardData

    entry = results["stages"][point_key]
    stage, method = entry["stage"], entry["method"]
    base, license_ = _base_and_license(results["model"])
    judge = results.get("judge") or {"name": entry.get("judge")}
    defense = _defense(results, stage)
    name = f"{results['name']}-{point_key}"
    data = ModelCardData(
        library_name="transformers",
        base_model=base,
        license=license_,
        tags=["ftguard", method, f"ftguard-{stage}"],
        model_name=name,
        eval_results=_eval_results(results, entry),
        ftguard={
            "stage": stage,
            "method": method,
            "defense": defense,
            "harmful_ratio": entry.get("harmful_ratio"),
            "judge": judge,
            "refusal_detector": entry.get("refusal_detector"),
            "config_hash": results["config_hash"],
            "version": results["ftguard_version"],
            "git": results.get("git"),
            "data": _data_report(results.get("data") or {}),
        },
    )
    ratio = entry.get("harmful_ratio")
    made = ", then ".join(f"{s}: `{d['method']}`" for s, d in defense.items())
    body = f"""
# {name}

A model saved by ftguard (a toolkit of defenses against harmful fine-tuning): the output of the **{stage}** stage, method **`{method}`**, of run `{results["name"]}`
from base model `{results["model"]}`. Stages that made it: {made}.
{f"The fine-tuning upload held a harmful ratio p = {ratio:g}." if ratio is not None else ""}

## Safety evaluation

{entry.get("n_harmful_prompts", "?")} held-out harmful prompts, greedy answers of at most
{entry.get("max_new_tokens", "?")} new tokens; judge `{judge.get("name")}`, refusal detector
`{(entry.get("refusal_detector") or {}).get("name", "none")}`. Rates in %, with their 95% intervals.

{_table(entry)}

{_caveat(str(judge.get("name")))}

## Reproduce

ftguard {results["ftguard_version"]} (git {results.get("git") or "unknown"}), config hash
`{results["config_hash"]}`: `ftguard run config.yaml` with the config.yaml of the run's directory (beside its
results.json), which must give the same config hash. The methods' settings and the hashes of the data files
are in this card's `ftguard` metadata.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(model_dir: Path | str, results: dict[str, Any], point_key: str) -> Path:
    path = Path(model_dir) / CARD
    from ftguard.pipeline.outputs import write_text_atomic

    write_text_atomic(path, str(build_model_card(results, point_key)))
    return path


def hub_token() -> str:
    """The hub token, from the environment only (a command-line token would be in the shell's history)."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise FtguardError(f"--push-to-hub needs a hub token: set ${TOKEN_ENV} (a write token)")
    return token


def final_model_key(run: Any) -> str:
    """The unit whose model a run ends with: post, else finetune, else align. One fine-tuning ratio only."""
    from ftguard.pipeline.units import finetune_keys, post_key_of

    if run.finetune is None:
        if run.align is None:
            raise FtguardError("--push-to-hub: the run trains no model (align and finetune are null)")
        return "align"
    keys = list(finetune_keys(run))
    if len(keys) > 1:
        raise FtguardError(
            f"--push-to-hub: the run makes {len(keys)} final models (data.finetune.ratios); push one ratio"
        )
    return post_key_of(keys[0]) if run.post is not None else keys[0]


def push_to_hub(model_dir: Path, repo_id: str, *, private: bool, token: str) -> str:
    """Upload ``model_dir`` (model, tokenizer, card) to ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi

    if not (Path(model_dir) / CARD).exists():
        log.warning("%s has no model card (its point was not evaluated): uploading without one", model_dir)
    api = HfApi()
    # upload_folder has no visibility setting: the repo is made private (or public) here, when it is created;
    # an existing repo keeps its visibility.
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    info = api.upload_folder(
        folder_path=str(model_dir),
        repo_id=repo_id,
        repo_type="model",
        token=token,
        commit_message="ftguard: upload model and card",
    )
    return str(info)
