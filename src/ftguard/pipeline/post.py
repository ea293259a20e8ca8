"""The post stage: repair one fine-tuned model (recovery, Antidote, SafeLoRA) and save it like a trained stage.

Output of a post directory: ``model/`` (the repaired full model + tokenizer, safetensors), ``report.json`` (what
the method changed) and ``COMPLETE.json`` last. ``work/`` holds a method's resumable state while it runs.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from transformers import set_seed

from ftguard.config import RunConfig
from ftguard.data.plan import DataPlan
from ftguard.methods.base import PostMethod
from ftguard.methods.context import ModelRef, PostContext
from ftguard.models import hardware_label, load_tokenizer, precision_label
from ftguard.pipeline.outputs import StageDir, write_json_atomic
from ftguard.schema import to_dict

log = logging.getLogger(__name__)


def post_stage(
    run: RunConfig,
    key: str,
    plan: DataPlan,
    *,
    method: PostMethod,
    base: ModelRef,
    aligned: ModelRef,
    finetuned: ModelRef,
    out: StageDir,
    harmful_ratio: float | None = None,
) -> ModelRef:
    """Repair ``finetuned`` with ``method`` (the resolved run's post-stage instance) into ``out``."""
    post = run.post
    assert post is not None
    set_seed(run.seed)
    tokenizer = load_tokenizer(finetuned.model_dir, trust_remote_code=run.model.trust_remote_code)
    out.path.mkdir(parents=True, exist_ok=True)
    work = out.path / "work"
    work.mkdir(exist_ok=True)
    ctx = PostContext(
        run=run,
        key=key,
        base=base,
        aligned=aligned,
        finetuned=finetuned,
        tokenizer=tokenizer,
        plan=plan,
        work_dir=work,
        harmful_ratio=harmful_ratio,
    )
    start = time.monotonic()
    model, report = method.repair(ctx)
    runtime = round(time.monotonic() - start, 1)
    log.info("%s: %s done in %.0f s", key, post.method, runtime)

    staging = out.begin()
    model.save_pretrained(staging / "model")
    tokenizer.save_pretrained(staging / "model")
    write_json_atomic(staging / "report.json", report)
    manifest = out.commit(
        {
            "stage": "post",
            "key": key,
            "method": post.method,
            "method_args": to_dict(method.config),
            "model_dir": "model",
            "harmful_ratio": harmful_ratio,
            "report": report,
            "runtime_s": runtime,
            # a repair that trains says what in (one-shot safety's autocast); the others are weight arithmetic
            "precision": report.get("precision") or precision_label(next(model.parameters()).dtype, None),
            "hardware": hardware_label(),
            "resumed": bool(report.get("resumed")),
        }
    )
    shutil.rmtree(out.path / "work", ignore_errors=True)
    return ModelRef.from_manifest(Path(out.path), manifest)
