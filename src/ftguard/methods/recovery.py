"""Safety recovery with rollback (Yang et al., IEEE S&P 2025, kangyangWHU/LLMAlignment; docs/methods.md,
Recovery).

After the user's fine-tune F, move a few weights of F's first K decoder layers back to the aligned model A's
values, choosing the weights whose gradient most wants the layer-K representation of harmful prompts to point
along A's "harmful direction"; undo part of each step where it hurts the task representation (rollback).

Algorithm (``sgdg_rollback_final.py`` ``AlignParamRollback``; defaults in ``RecoveryConfig``):

1. K = ⌊fraction · L⌋ layers. d_harm = mean over H of A's layer-K hidden state (no final norm) at the last prompt
   token; d_ben = the same on T with F. W ← F.
2. Recovery step: backpropagate Σ_batches −cos(mean_batch h_K(W), d_harm) (no optimizer; gradients keep
   accumulating across steps until a rollback zeroes them). Candidates: non-norm entries of layers < K with
   sign(W − A) = sign(grad) (descent moves them toward A). Restore the top k = ⌈r·N⌉ candidates by |grad| to A
   (N = parameters of all decoder layers of the full model).
3. Rollback step: zero the grads, backpropagate Σ −cos(mean h_K(W, task batch), d_ben); among the entries restored
   in *this* recovery step whose sign(W − F) = sign(grad), revert the top ⌈ρ_rb · #candidates⌉ to F; zero grads.
4. Schedule: ``warmup_steps`` recovery steps, checkpoint, task score. If it is below (1 − δ)·score(F), enable
   rollback: restart from F and run ``steps`` steps of recovery + rollback; otherwise continue recovery-only up to
   ``steps``. A checkpoint every ``save_every`` steps. Returned: the checkpoint just before the first one whose task
   score is ≤ (1 − δ)·score(F) (``eval_all_steps`` + ``get_largest_step``: step − interval), F itself if the first
   one already fails, and the last checkpoint if none fails.

Differences from the original, each a bug, an unstated accident or a cost, and what we do instead:

* Top-k: the original restores entries with |grad| > τ (τ = the k-th largest), i.e. k − 1 of them (an
  off-by-one); here exactly k (ties at τ broken in parameter order), and k is capped at the number of candidates
  (``torch.topk`` raises there in the original).
* Batches: the original loops ``zip(harmful_loader, task_loader)``, silently dropping harmful batches when T has
  fewer prompts than H; here each pass uses all of its prompts.
* Checkpoints are scored as they are made and the run stops at the first failing one (the original trains all
  steps, then scores them in order); the returned model is the same, later steps could never be returned.
* A model whose task score is 0 has nothing to lose: the literal "≤ (1 − δ)·0" would reject every checkpoint, so
  then no checkpoint fails. Enabling rollback keeps the original's strict "<".
* Norm parameters are recognised by module class (``*Norm``), not by "layernorm" in the name.
* Models are in eval mode (the original's ``.train()`` only matters for dropout, which its models do not use).

Memory: W is one full model (its upper layers are F's); A's and F's tensors are streamed one at a time from their
safetensors files, so besides W there are only the accumulated gradients and one byte per entry of layers < K.
Every entry of W is either A's or F's value, so the state (``ctx.work_dir/state.safetensors``: restored-entry
masks, accumulated gradients, step, rollback flag, scores) rebuilds W exactly and a resumed run ends bit-identical.
Data: H = prompts of ``plan.alignment_harmful`` (≤ 256); T = prompts of ``plan.task_validation`` (≤ 256): clean
task prompts outside every upload. The upload itself cannot be used: the provider cannot tell its harmful samples
apart, and the original's T is the task's clean training set. The task score is FA on ``plan.task_validation``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftguard.config import RunConfig
from ftguard.cost import PROMPT_TOKENS, GpuSpec, alignment_n, cost_result, generation, train_seconds
from ftguard.errors import FtguardError
from ftguard.methods.base import PostMethod
from ftguard.methods.context import PostContext
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.hooks import decoder_parts

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


@dataclass
class RecoveryConfig:
    # docs/methods.md, Recovery: layer_end_mapping (21 of 32 layers for 7B) and the S&P main script use ⌊4L/6⌋
    # (run_recover_exp.py tries ⌊2L/6⌋).
    layer_fraction: float = field(
        default=4 / 6, metadata={"help": "K = ⌊fraction · L⌋ decoder layers are repaired (original: 4/6)"}
    )
    # run_recover_exp.py sparsity = 0.002; the paper's results folders are ".../0.002/0.2".
    recovery_rate: float = field(
        default=0.002, metadata={"help": "r: each step restores ⌈r·N⌉ weights to A (original: 0.001–0.002)"}
    )
    rollback_rate: float = field(
        default=0.2, metadata={"help": "share of a step's restorable entries reverted to F (original: 0.2)"}
    )
    steps: int = field(default=20, metadata={"help": "recovery steps in total (original: 20)"})
    warmup_steps: int = field(
        default=5, metadata={"help": "recovery-only steps before the rollback decision (original: 5)"}
    )
    save_every: int = field(
        default=5, metadata={"help": "checkpoint (and task-score) interval in steps (original: 5)"}
    )
    metric_drop: float = field(
        default=0.05, metadata={"help": "δ: a task score ≤ (1 − δ)·F's stops the run (original: 0.05)"}
    )
    rollback: bool = field(
        default=True, metadata={"help": "allow the rollback phase (the original's rollback_flag)"}
    )
    n_harmful: int = field(
        default=256, metadata={"help": "harmful prompts H from data alignment_harmful (original: 256)"}
    )
    n_task: int = field(
        default=256, metadata={"help": "task prompts T from task_validation (original: up to 256)"}
    )
    batch_size: int = field(
        default=8, metadata={"help": "prompts per backward batch (run_recover_exp.py: 8)"}
    )
    dtype: str = field(default="float32", metadata={"help": "dtype of W, A and F (original: fp32)"})

    def __post_init__(self) -> None:
        check(0 < self.layer_fraction <= 1, "layer_fraction", f"must be in (0, 1], got {self.layer_fraction}")
        check(0 <= self.recovery_rate <= 1, "recovery_rate", f"must be in [0, 1], got {self.recovery_rate}")
        check(0 <= self.rollback_rate <= 1, "rollback_rate", f"must be in [0, 1], got {self.rollback_rate}")
        check(self.steps >= 1, "steps", f"must be ≥ 1, got {self.steps}")
        check(
            1 <= self.warmup_steps <= self.steps,
            "warmup_steps",
            f"must be in [1, steps], got {self.warmup_steps}",
        )
        check(self.save_every >= 1, "save_every", f"must be ≥ 1, got {self.save_every}")
        check(0 <= self.metric_drop < 1, "metric_drop", f"must be in [0, 1), got {self.metric_drop}")
        for key in ("n_harmful", "n_task", "batch_size"):
            check(getattr(self, key) >= 1, key, f"must be ≥ 1, got {getattr(self, key)}")
        check(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "use float32, bfloat16 or float16")


def layer_count(num_layers: int, fraction: float) -> int:
    return max(1, math.floor(num_layers * fraction))


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def last_token_states(model: nn.Module, k: int, batch: Batch) -> torch.Tensor:
    """Layer-k hidden state at the last position ([batch, d]); layers ≥ k, the final norm and the head never run."""
    layers = _layers(model)

    def stop(_module, _inputs, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = layers[k - 1].register_forward_hook(stop)
    try:
        model.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    except _Stop as s:
        return s.hidden[:, -1, :]  # prompts are left-padded: the last position is every prompt's last token
    finally:
        handle.remove()
    raise FtguardError("recovery: the decoder never reached layer K; is the model Llama-like?")


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


@torch.no_grad()
def mean_direction(model: nn.Module, k: int, batches: Iterable[Batch]) -> torch.Tensor:
    states = [last_token_states(model, k, b).float() for b in batches]
    return torch.cat(states).mean(dim=0)


def prompt_batches(
    tokenizer: Any, prompts: list[str], batch_size: int, device: torch.device, *, special: bool
) -> list[Batch]:
    """Left-padded batches in prompt order (the original's loaders do not shuffle)."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        out = []
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=special,
            )
            out.append(
                {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
            )
        return out
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


class SafetensorsSource(Mapping[str, torch.Tensor]):
    """A saved model's tensors by name, read one at a time (memory-mapped) instead of loading a second model."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open

        self._files = {}
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            for key in handle.keys():
                self._files[key] = handle
        if not self._files:
            raise FtguardError(
                f"recovery: no safetensors weights in {model_dir}; re-run the stage that wrote it"
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._files:
            raise FtguardError(
                f"recovery: tensor {key!r} missing from the saved model; re-run the stage that wrote it"
            )
        return self._files[key].get_tensor(key)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def top_k_masks(
    score: Callable[[str], torch.Tensor], candidates: dict[str, torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """Exactly min(k, #candidates) candidate entries with the largest ``score(name)`` (ties at the threshold taken
    in name order). Scores are recomputed per tensor rather than kept, so only the candidates' values are held."""
    values = torch.cat([score(n)[c].flatten() for n, c in candidates.items()])
    k = min(k, values.numel())
    if k == 0:
        return {n: torch.zeros_like(c) for n, c in candidates.items()}
    tau = torch.topk(values, k).values[-1]
    del values
    chosen, ties = {}, {}
    for n, c in candidates.items():
        s = score(n)
        chosen[n], ties[n] = c & (s > tau), c & (s == tau)
    need = k - sum(int(m.sum()) for m in chosen.values())
    for n, tie in ties.items():
        if need <= 0:
            break
        flat = tie.flatten()
        take = flat & (flat.cumsum(0) <= need)
        chosen[n] = chosen[n] | take.view_as(tie)
        need -= int(take.sum())
    return chosen


class Recoverer:
    """W (the model, in place) between A and F: the recovery and rollback steps and their state."""

    def __init__(
        self,
        model: nn.Module,
        k: int,
        aligned: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, torch.Tensor],
        harmful: list[Batch],
        task: list[Batch],
        d_harm: torch.Tensor,
        d_ben: torch.Tensor,
        recovery_rate: float,
        rollback_rate: float,
    ) -> None:
        self.model, self.k, self.a, self.f = model, k, aligned, finetuned
        self.harmful, self.task, self.d_harm, self.d_ben = harmful, task, d_harm, d_ben
        self.recovery_rate, self.rollback_rate = recovery_rate, rollback_rate
        decoder_parts(model, "recovery")  # a clear error for layouts without model.layers
        prefix = _layer_prefix(model)
        layers = _layers(model)
        self.n_total = sum(p.numel() for layer in layers for p in layer.parameters())
        self.params: dict[str, nn.Parameter] = {}
        for i, layer in enumerate(layers[:k]):
            for mod_name, module in layer.named_modules():
                if type(module).__name__.endswith("Norm"):
                    continue
                for p_name, p in module.named_parameters(recurse=False):
                    self.params[f"{prefix}.{i}.{mod_name + '.' if mod_name else ''}{p_name}"] = p
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self.restored = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.params.items()}
        model.eval()

    def _value(self, source: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        p = self.params[name]
        return source[name].to(device=p.device, dtype=p.dtype)

    def backprop(self, batches: list[Batch], direction: torch.Tensor) -> float:
        total = 0.0
        for batch in batches:
            mean = last_token_states(self.model, self.k, batch).float().mean(dim=0)
            loss = -torch.nn.functional.cosine_similarity(mean, direction.to(mean.device), dim=0)
            loss.backward()
            total += loss.item()
        return total

    def _abs_grad(self, name: str) -> torch.Tensor:
        p = self.params[name]
        return p.grad.abs() if p.grad is not None else torch.zeros_like(p)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def _select(
        self, target: Mapping[str, torch.Tensor], within: dict[str, torch.Tensor] | None, share: float | None
    ):
        candidates = {}
        for name, p in self.params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            diff = p.detach() - self._value(target, name)
            cand = ((diff < 0) & (g < 0)) | ((diff > 0) & (g > 0))  # a descent step moves p toward the target
            candidates[name] = cand & within[name] if within is not None else cand
        n_cand = sum(int(c.sum()) for c in candidates.values())
        k = math.ceil(self.recovery_rate * self.n_total) if share is None else math.ceil(share * n_cand)
        chosen = top_k_masks(self._abs_grad, candidates, k)
        with torch.no_grad():
            for name, p in self.params.items():
                if chosen[name].any():
                    p[chosen[name]] = self._value(target, name)[chosen[name]]
        return chosen, n_cand

    def recovery_step(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        loss = self.backprop(self.harmful, self.d_harm)
        chosen, n_cand = self._select(self.a, None, None)
        for name, m in chosen.items():
            self.restored[name] |= m
        return chosen, {
            "harmful_loss": loss,
            "candidates": n_cand,
            "restored": sum(int(m.sum()) for m in chosen.values()),
        }

    def rollback_step(self, step_chosen: dict[str, torch.Tensor]) -> dict[str, float]:
        self.zero_grad()
        loss = self.backprop(self.task, self.d_ben)
        chosen, n_cand = self._select(self.f, step_chosen, self.rollback_rate)
        for name, m in chosen.items():
            self.restored[name] &= ~m
        self.zero_grad()
        return {
            "task_loss": loss,
            "rollback_candidates": n_cand,
            "reverted": sum(int(m.sum()) for m in chosen.values()),
        }

    def set_restored(self, masks: Mapping[str, torch.Tensor]) -> None:
        """W ← where(mask, A, F) on layers < K: every entry of W is one of the two."""
        with torch.no_grad():
            for name, p in self.params.items():
                mask = masks[name].to(p.device)
                p.copy_(torch.where(mask, self._value(self.a, name), self._value(self.f, name)))
                self.restored[name] = mask.clone()

    def n_restored(self) -> int:
        return sum(int(m.sum()) for m in self.restored.values())


def _layer_prefix(model: nn.Module) -> str:
    layers = _layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise FtguardError("recovery: cannot name the decoder layers of this model")


# ------------------------------------------------------------------------------------------------ schedule


class _State:
    """Resumable state in one safetensors file (replaced atomically): masks, gradients, and the schedule as JSON."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        if self.path is None or not self.path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            return meta, {k: f.get_tensor(k) for k in f.keys()}

    def save(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if self.path is None:
            return
        from safetensors.torch import save_file

        tmp = self.path.with_suffix(".tmp")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata={"state": json.dumps(meta)},
        )
        os.replace(tmp, self.path)


def run_schedule(
    rec: Recoverer,
    cfg: RecoveryConfig,
    score: Callable[[nn.Module], float],
    state_path: Path | None = None,
    *,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """The warm-up / rollback / checkpoint / stop schedule (docs/methods.md, Recovery); leaves W at the
    returned checkpoint.

    ``stop_after`` (tests) returns after that many steps with the state saved, as an interruption would.
    """
    store = _State(state_path)
    loaded = store.load()
    if loaded is None:
        f_score = score(rec.model)
        meta: dict[str, Any] = {
            "phase": "warmup",
            "step": 0,
            "rollback": False,
            "f_score": f_score,
            "checkpoints": [],
            "good_step": 0,
            "done": False,
            "steps": [],
        }
        good = {n: torch.zeros_like(m) for n, m in rec.restored.items()}
    else:
        meta, tensors = loaded
        rec.set_restored({n: tensors[f"mask/{n}"].bool() for n in rec.params})
        good = {n: tensors[f"good/{n}"].bool() for n in rec.params}
        for n, p in rec.params.items():
            p.grad = tensors[f"grad/{n}"].to(p.device, p.dtype) if f"grad/{n}" in tensors else None
        meta["resumed"] = True
    f_score = meta["f_score"]
    minimum = f_score - f_score * cfg.metric_drop

    def save() -> None:
        tensors = {f"mask/{n}": m.to(torch.uint8) for n, m in rec.restored.items()}
        tensors |= {f"good/{n}": m.to(torch.uint8) for n, m in good.items()}
        tensors |= {f"grad/{n}": p.grad for n, p in rec.params.items() if p.grad is not None}
        store.save(meta, tensors)

    def checkpoint(step: int) -> bool:
        """Score the checkpoint; True if the run must stop here (the first failing checkpoint)."""
        nonlocal good
        s = score(rec.model)
        meta["checkpoints"].append(
            {"step": step, "task_score": s, "rollback": meta["rollback"], "restored": rec.n_restored()}
        )
        if s <= minimum and f_score > 0:
            return True
        good = {n: m.clone() for n, m in rec.restored.items()}
        meta["good_step"] = step
        return False

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps, initial=meta["step"], desc=_bar_label(meta), unit="step", disable=meta["done"]
    )
    done_now = 0
    while not meta["done"]:
        if stop_after is not None and done_now >= stop_after:
            bar.close()
            return meta
        step = meta["step"]
        chosen, info = rec.recovery_step()
        if meta["rollback"]:
            info |= rec.rollback_step(chosen)
        meta["steps"].append({"step": step + 1, "rollback": meta["rollback"], **info})
        meta["step"] = step = step + 1
        done_now += 1
        bar.update(1)
        if meta["phase"] == "warmup" and step == cfg.warmup_steps:
            s = score(rec.model)
            meta["warmup_score"] = s
            if cfg.rollback and s < minimum:
                # Restart from F with rollback on; the warm-up checkpoint is not among the returned candidates.
                meta |= {"phase": "main", "rollback": True, "step": 0}
                bar.reset(total=cfg.steps)
                bar.set_description(_bar_label(meta))
                rec.set_restored({n: torch.zeros_like(m) for n, m in rec.restored.items()})
                rec.zero_grad()
            else:
                meta["phase"] = "main"
                meta["checkpoints"].append(
                    {"step": step, "task_score": s, "rollback": False, "restored": rec.n_restored()}
                )
                if s <= minimum and f_score > 0:
                    meta["done"] = True
                else:
                    good = {n: m.clone() for n, m in rec.restored.items()}
                    meta["good_step"] = step
        elif meta["phase"] == "main" and step % cfg.save_every == 0:
            meta["done"] = checkpoint(step)
        if meta["phase"] == "main" and step >= cfg.steps:
            meta["done"] = True
        save()
        bar.set_postfix(restored=rec.n_restored(), refresh=False)
    bar.close()
    rec.set_restored(good)
    return meta


def _bar_label(meta: Mapping[str, Any]) -> str:
    return "recovery + rollback" if meta["rollback"] else "recovery"


# ------------------------------------------------------------------------------------------------ method


@register_method
class Recovery(PostMethod):
    """Restore F's most harm-relevant weights to A's values, with rollback guarding the task
    (docs/methods.md, Recovery)."""

    name = "recovery"
    paper = "Yang et al., Alleviating the Fear of Losing Alignment in LLM Fine-tuning, IEEE S&P 2025"
    summary = "post-hoc recovery: restore a few weights to the aligned model, roll back what the task needs"
    config_class = RecoveryConfig
    required_roles = ("alignment_harmful", "task_validation")
    # One forward of 256 prompts through 20 SmolLM2 layers takes minutes on 2 CPU cores; the demo uses 32 of each.
    demo_args: ClassVar[dict[str, Any]] = {"n_harmful": 32, "n_task": 32}

    def cost(self, run: RunConfig, n_params: float, gpu: GpuSpec) -> dict[str, Any]:
        """Upper bound: the rollback branch with every checkpoint scored.

        Each recovery step is a forward + backward with full weight gradients (6N per token) over the H harmful
        prompts through the first ``layer_fraction`` of the layers; each rollback step the same over T task
        prompts; two direction forwards (d_harm on A, d_ben on F); FA generation on ``post.validation_n`` task
        prompts at every checkpoint, in the recovery dtype.
        """
        cfg = self.config
        n_align, note = alignment_n(run)
        h = min(cfg.n_harmful, n_align)
        t = min(cfg.n_task, run.post.validation_n if run.post is not None else cfg.n_task)
        frac = cfg.layer_fraction
        prompt = PROMPT_TOKENS["harmful"]
        task_prompt = PROMPT_TOKENS.get(run.data.finetune.task, 96)
        recovery_steps = (
            cfg.warmup_steps + cfg.steps
        )  # warm-up, then a restart from F when rollback is enabled
        rollback_steps = cfg.steps if cfg.rollback else 0
        tokens = recovery_steps * h * prompt + rollback_steps * t * task_prompt
        flops = tokens * 6.0 * n_params * frac + (h * prompt + t * task_prompt) * 2.0 * n_params * frac
        fp32 = cfg.dtype == "float32"
        rate = gpu.fp32_tflops if fp32 else gpu.peak_tflops
        checkpoints = math.ceil(recovery_steps / cfg.save_every) + 1  # + F's own score
        gen_seconds, gen_tokens, gen_flops = generation(
            n_params,
            checkpoints * t,
            task_prompt,
            run.evaluate.task_max_new_tokens,
            run.evaluate.batch_size,
            4 if fp32 else 2,
            rate,
            gpu,
        )
        notes = [
            f"{run.model.name} N={n_params:.3g}",
            note,
            f"recovery: {recovery_steps} recovery passes over {h} harmful prompts + {rollback_steps} rollback "
            f"passes over {t} task prompts ({prompt}/{task_prompt} tokens each, guessed), 6N × {frac:.2f} of the "
            f"layers per token, {'fp32' if fp32 else cfg.dtype}; FA on {t} prompts at {checkpoints} checkpoints",
        ]
        seconds = train_seconds(flops, rate, gpu) + gen_seconds
        return cost_result(seconds, tokens + gen_tokens, flops + gen_flops, notes)

    def repair(self, ctx: PostContext) -> tuple[Any, dict[str, Any]]:
        from ftguard.data.template import format_prompt
        from ftguard.evaluation.task_score import task_score

        cfg, run, tok = self.config, ctx.run, ctx.tokenizer
        special = run.model.template != "chat"

        def prompts(examples) -> list[str]:
            return [
                format_prompt(
                    ex, style=run.model.template, tokenizer=tok, response_newline=run.model.response_newline
                )
                for ex in examples
            ]

        model = ctx.load(ctx.finetuned, dtype=cfg.dtype)
        from ftguard.models import default_device

        model.to(default_device())
        device = model.device
        k = layer_count(len(_layers(model)), cfg.layer_fraction)
        harmful = prompt_batches(
            tok, prompts(ctx.plan.alignment_harmful[: cfg.n_harmful]), cfg.batch_size, device, special=special
        )
        task = prompt_batches(
            tok, prompts(ctx.plan.task_validation[: cfg.n_task]), cfg.batch_size, device, special=special
        )

        directions = ctx.work_dir / "directions.safetensors"
        if directions.is_file():
            d = load_file(str(directions), device=str(device))
        else:
            aligned = ctx.load(ctx.aligned, dtype=cfg.dtype).to(device)  # only while d_harm is computed
            d = {
                "harm": mean_direction(aligned.eval(), k, harmful),
                "ben": mean_direction(model.eval(), k, task),
            }
            del aligned
            save_file({name: v.contiguous() for name, v in d.items()}, str(directions))
        rec = Recoverer(
            model,
            k,
            SafetensorsSource(ctx.aligned.model_dir),
            SafetensorsSource(ctx.finetuned.model_dir),
            harmful,
            task,
            d["harm"],
            d["ben"],
            cfg.recovery_rate,
            cfg.rollback_rate,
        )

        def score(m: nn.Module) -> float:
            return task_score(m, tok, run, ctx.plan.task, ctx.plan.task_validation)

        meta = run_schedule(rec, cfg, score, ctx.work_dir / "state.safetensors")
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        report = {
            "layers_repaired": k,
            "decoder_parameters": rec.n_total,
            "rollback": meta["rollback"],
            "finetuned_task_score": meta["f_score"],
            "minimum_task_score": meta["f_score"] * (1 - cfg.metric_drop),
            "warmup_task_score": meta.get("warmup_score"),
            "checkpoints": meta["checkpoints"],
            "selected_step": meta["good_step"],
            "restored_entries": rec.n_restored(),
            "n_harmful_prompts": min(cfg.n_harmful, len(ctx.plan.alignment_harmful)),
            "n_task_prompts": min(cfg.n_task, len(ctx.plan.task_validation)),
            "steps": meta["steps"],
            "resumed": bool(meta.get("resumed")),
        }
        log.info(
            "%s: recovery kept step %s (%d entries restored to the aligned model)",
            ctx.key,
            meta["good_step"],
            rec.n_restored(),
        )
        return model, report
