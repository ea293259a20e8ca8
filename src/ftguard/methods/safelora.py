"""SafeLoRA: project the user's update onto the alignment subspace where it strays from it (post stage).

Hsu et al., "Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning Large Language Models",
NeurIPS 2024; original code IBM/SafeLoRA. Training-free and data-free: it needs only three sets of weights,
the model before alignment (W_base = ``ctx.base``), the aligned model (W_A = ``ctx.aligned``) and the user's
fine-tune (``ctx.finetuned``).

For every target module i (a Linear weight of shape [out, in]; the modules the user's LoRA adapts):

1. V_i = W_A,i − W_base,i, the alignment matrix.
2. C_i = V_i V_iᵀ / ‖V_i‖_F (paper Eq. 1 and the original ``get_aligned_matrix``; ``projection: approx``), or the
   exact orthogonal projector onto the column space of V_i (``projection: exact``; the paper's exact variant
   V(VᵀV)⁻¹Vᵀ, computed from an SVD so it also holds when VᵀV is singular, e.g. when the alignment was a LoRA).
3. ΔW_i, the user's update: scaling · B·A of the user's LoRA (double topology, as in the paper), or W_F,i − W_A,i
   (single and full topologies, see below).
4. s_i = cos(vec(C_i ΔW_i), vec(ΔW_i)).
5. Select the layers to project: s_i ≤ threshold (``select_layers_type: threshold``), or the
   ``num_proj_layers`` smallest s_i (``number``).
6. Output: W_A,i + C_i ΔW_i for the selected modules; every other weight is F's, bit for bit.

Topologies. ``double`` is the paper's setting: the user's LoRA was trained on the merged aligned model, so ΔW is
read from the adapter. ``single`` continues the alignment LoRA, so that adapter holds the alignment delta too
(B·A = V + user's change); projecting it would project the alignment itself, so ΔW = W_F − W_A, the user's
change in weight space (rank ≤ 2r). ``full`` has no adapter: ΔW = W_F − W_A on ``target_modules`` (default: the
run's ``adapter.finetune.target_modules``). Both use the same rule on a different ΔW, not a different method.

Differences from the original code (IBM/SafeLoRA ``model.py``, class ``SafeLoRA``) and from its later port in
PEFT (``peft/utils/safelora.py``), each not copied:

* Layers are matched by module name. The original walks the base and aligned models' ``named_parameters()`` in
  step (``get_aligned_matrix``: ``zip`` over both, kept when a target-module name is a substring), then hands
  those matrices out by a running counter while walking the LoRA model's parameters, taking a lora tensor with
  ``shape[0] == r`` for lora_A and the next one for lora_B: a substring that also matches another parameter, or
  a module whose out_features equals r, shifts every later pairing silently. The PEFT port pairs by position
  too, over two independently ordered name lists (the adapter file's and the model's weight map).
* ``number`` projects exactly the k least similar layers (ties broken by module order). The original sets the
  threshold to the k-th smallest cosine rounded to 5 decimals and projects every layer ≤ it, so ties project
  more than k (the PEFT port's first version rounds the same way; it also edits the adapter in place during a
  first, threshold-0.5 pass that its second pass then starts from). ``threshold`` compares with ≤ as both codes
  do (the paper says "below").
* C·ΔW is computed as V(VᵀΔW)/‖V‖_F (no [out × out] matrix; equal in exact arithmetic) in float32 on the
  model's device. The original keeps the models' dtype; the PEFT port casts C to bf16 (its ``dtype`` default).
* A module whose alignment matrix is zero (the alignment never changed it) has no alignment subspace: here an
  error naming the modules. The original divides 0 by 0, its NaN cosine fails the ≤ test, and the module is
  silently left unprojected (in ``number`` mode a NaN can even become the threshold, and then nothing is
  projected); the later PEFT port raises an error when base and aligned weights are equal.
* Both codes project lora_B only (C(BA) = (CB)A) and compute the cosine on B·A without the LoRA scaling; here
  ΔW carries the scaling. Neither changes the result: a positive factor leaves a cosine as it is.

Note that C = VVᵀ/‖V‖_F is not a projector (C² ≠ C unless V's nonzero singular values are all equal to ‖V‖_F);
only ``projection: exact`` is idempotent.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ftguard.config import RunConfig
from ftguard.cost import GpuSpec, cost_result, train_seconds
from ftguard.errors import FtguardError
from ftguard.methods.base import PostMethod
from ftguard.methods.context import PostContext
from ftguard.methods.registry import register_method
from ftguard.schema import check

log = logging.getLogger(__name__)


@dataclass
class SafeLoraConfig:
    """Defaults: IBM/SafeLoRA ``SafeLoRAConfig`` (select_layers_type number, num_proj_layers 10, threshold 0.5)."""

    select_layers_type: Literal["threshold", "number"] = field(
        default="number",
        metadata={
            "help": "which layers to project: 'threshold' = every layer with similarity ≤ threshold; 'number' "
            "= the num_proj_layers least similar (IBM/SafeLoRA default: number)"
        },
    )
    threshold: float = field(
        default=0.5,
        metadata={"help": "cosine threshold τ of the threshold mode, in [-1, 1] (IBM/SafeLoRA default 0.5)"},
    )
    num_proj_layers: int = field(
        default=10,
        metadata={
            "help": "layers projected in number mode; a layer is one adapted weight matrix, e.g. layer 3's "
            "q_proj (IBM/SafeLoRA default 10, of 64 q/v matrices in Llama-2-7B)"
        },
    )
    projection: Literal["approx", "exact"] = field(
        default="approx",
        metadata={
            "help": "'approx' = C = VVᵀ/‖V‖_F (paper Eq. 1, original code); 'exact' = the orthogonal "
            "projector onto the column space of V (the paper's exact variant)"
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "module names to consider (e.g. [q_proj, v_proj]); null = the modules the user's LoRA "
            "adapts, or adapter.finetune.target_modules with topology full"
        },
    )

    def __post_init__(self) -> None:
        check(
            -1.0 <= self.threshold <= 1.0,
            "threshold",
            f"is a cosine similarity, must be in [-1, 1], got {self.threshold}",
        )
        check(self.num_proj_layers >= 1, "num_proj_layers", f"must be ≥ 1, got {self.num_proj_layers}")
        if self.target_modules is not None:
            check(
                bool(self.target_modules) and not isinstance(self.target_modules, str),
                "target_modules",
                f"must be a non-empty list of module names or null, got {self.target_modules!r}",
            )


def projected_update(delta: torch.Tensor, v: torch.Tensor, projection: str = "approx") -> torch.Tensor:
    """C·ΔW for the alignment matrix V (both [out, in]), without forming the [out, out] matrix C."""
    if projection == "approx":
        return v @ (v.T @ delta) / torch.linalg.matrix_norm(v)
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    # numpy's matrix_rank tolerance: singular values below it are rounding noise, not alignment directions.
    basis = u[:, s > s.max() * max(v.shape) * torch.finfo(v.dtype).eps]
    return basis @ (basis.T @ delta)


def select_layers(similarity: list[float], cfg: SafeLoraConfig) -> list[bool]:
    """Which layers to project (step 5)."""
    if cfg.select_layers_type == "threshold":
        return [s <= cfg.threshold for s in similarity]
    chosen = set(sorted(range(len(similarity)), key=lambda i: similarity[i])[: cfg.num_proj_layers])
    return [i in chosen for i in range(len(similarity))]


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _target_weights(model: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """float32 CPU copies of the weights of the target modules, by module name."""
    found = {}
    for name, module in model.named_modules():
        if _matches(name, targets) and hasattr(module, "weight"):
            if not isinstance(module, nn.Linear):
                raise FtguardError(
                    f"SafeLoRA projects Linear weights [out, in]; '{name}' is a {type(module).__name__}: "
                    "set post.args.target_modules to Linear layers"
                )
            found[name] = module.weight.detach().to("cpu", torch.float32, copy=True)
    if not found:
        raise FtguardError(
            f"post.args.target_modules {targets} match no module of {type(model).__name__}: "
            "name its Linear layers, e.g. [q_proj, v_proj]"
        )
    return found


def adapter_deltas(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(W_A, ΔW = scaling·B·A) per LoRA-adapted module of a PeftModel, by the plain model's module names."""
    from peft.tuners.lora import LoraLayer

    weights, deltas = {}, {}
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if module.use_dora.get(adapter, False):
                raise FtguardError(
                    f"the user's LoRA uses DoRA on '{name}': SafeLoRA projects plain B·A updates"
                )
        if not isinstance(module.base_layer, nn.Linear):
            raise FtguardError(
                f"SafeLoRA projects Linear weights; the LoRA on '{name}' wraps a "
                f"{type(module.base_layer).__name__}"
            )
        weights[name] = module.base_layer.weight.detach().to("cpu", torch.float32, copy=True)
        # In float32 even for a bf16 model (PEFT's get_delta_weight returns the weights' dtype).
        deltas[name] = sum(
            module.scaling[a]
            * module.lora_B[a].weight.detach().float()
            @ module.lora_A[a].weight.detach().float()
            for a in module.active_adapters
        ).cpu()
    return weights, deltas


def alignment_matrices(
    ctx: PostContext,
    w_aligned: dict[str, torch.Tensor],
    hint: str = "set post.args.target_modules to modules in adapter.align.target_modules",
) -> dict[str, torch.Tensor]:
    """Step 1: V = W_A − W_base for the modules of ``w_aligned``; a module the align stage never changed has no
    subspace, and is refused (``hint`` says what to change)."""
    base = ctx.load(ctx.base)
    w_base = _target_weights(base, list(w_aligned))
    del base
    gc.collect()
    v = {n: w_aligned[n] - w_base[n] for n in w_aligned}
    del w_base
    unchanged = [n for n, m in v.items() if not torch.any(m)]
    if unchanged:
        raise FtguardError(
            f"the align stage did not change {unchanged[:4]}{'…' if len(unchanged) > 4 else ''}, so "
            f"they have no alignment subspace: {hint}"
        )
    return v


def update_similarity(
    delta: torch.Tensor, v: torch.Tensor, projection: str = "approx"
) -> tuple[torch.Tensor, float]:
    """Steps 2 and 4: C·ΔW and s = cos(vec(C·ΔW), vec(ΔW))."""
    projected = projected_update(delta, v, projection)
    return projected, torch.nn.functional.cosine_similarity(
        projected.flatten(), delta.flatten(), dim=0
    ).item()


@register_method
class SafeLora(PostMethod):
    """Project the user's update onto the alignment subspace V = W_aligned − W_base where it is least similar.

    Steps (numbered as in the module docstring): alignment matrices from base and aligned weights (1), the
    user's update from the adapter or the merged difference (3), similarities and selection (2, 4, 5), and the
    projected weights written into F (6).
    """

    name = "safelora"
    paper = "Hsu et al., Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning LLMs, NeurIPS 2024"
    summary = (
        "projects the fine-tuning update onto the aligned−base subspace in the layers where it strays from it"
    )
    config_class = SafeLoraConfig

    def cost(self, run: RunConfig, n_params: float, gpu: GpuSpec) -> dict[str, Any]:
        # Projections of the adapted matrices, about d³ each (≈1e13 FLOPs at 7B): seconds.
        flops = 2.0 * n_params * 2048
        notes = [
            f"{run.model.name} N={n_params:.3g}",
            "safelora: weight projections only, counted as a forward over 2048 tokens",
        ]
        return cost_result(train_seconds(flops, gpu.peak_tflops, gpu), 0, flops, notes)

    def check_run_config(self, run: RunConfig, stage: str) -> None:
        check(
            run.align is not None,
            "post.method",
            "safelora needs the align stage: its subspace is aligned − base weights (set align.method, e.g. sft)",
        )

    def _targets(self, ctx: Any) -> list[str] | None:
        if self.config.target_modules is not None:
            return list(self.config.target_modules)
        if ctx.run.adapter.trains_full("finetune"):
            return list(ctx.run.adapter.finetune.target_modules)
        return None  # the adapter's own modules

    def repair(self, ctx: PostContext) -> tuple[Any, dict[str, Any]]:
        from ftguard.models import load_lora

        cfg, topology = self.config, ctx.run.adapter.topology
        full = ctx.run.adapter.trains_full("finetune")
        targets = self._targets(ctx)
        # a full-parameter fine-tune of the merged aligned model (finetune_full) is read like topology full
        from_adapter = topology == "double" and not full
        if not full and not ctx.finetuned.adapter_dir:
            raise FtguardError(
                f"{ctx.key}: topology {topology} but the fine-tuned model has no adapter folder: "
                "re-run the finetune stage"
            )

        # Step 3 (double): ΔW = scaling·B·A, read on the model the adapter was trained on (the aligned model).
        aligned = ctx.load(ctx.aligned)
        if from_adapter:
            peft_model = load_lora(aligned, ctx.finetuned.adapter_dir, trainable=False)
            w_aligned, deltas = adapter_deltas(peft_model)
            if targets is not None:
                keep = [n for n in deltas if _matches(n, targets)]
                if not keep:
                    raise FtguardError(
                        f"post.args.target_modules {targets} match none of the user's LoRA modules "
                        f"{sorted(deltas)}: name a subset of adapter.finetune.target_modules"
                    )
                w_aligned, deltas = {n: w_aligned[n] for n in keep}, {n: deltas[n] for n in keep}
            del peft_model
        else:
            if targets is None:  # single: the modules of the continued alignment LoRA
                from peft import PeftConfig

                targets = sorted(PeftConfig.from_pretrained(ctx.finetuned.adapter_dir).target_modules)
            w_aligned = _target_weights(aligned, targets)
        del aligned
        gc.collect()

        v = alignment_matrices(ctx, w_aligned)  # step 1

        model = ctx.load(ctx.finetuned)
        modules = dict(model.named_modules())
        if not from_adapter:  # step 3 (single, full): the user's change of the merged weights
            deltas = {
                n: modules[n].weight.detach().to("cpu", torch.float32) - w_aligned[n] for n in w_aligned
            }

        # Steps 2 and 4: projected updates and their similarity to the update.
        names = [n for n in modules if n in deltas]  # the model's layer order
        device = modules[names[0]].weight.device
        projected, similarity = {}, []
        for n in names:
            projected[n], s = update_similarity(deltas[n].to(device), v[n].to(device), cfg.projection)
            similarity.append(s)

        # Steps 5 and 6.
        chosen = select_layers(similarity, cfg)
        with torch.no_grad():
            for n, project in zip(names, chosen, strict=True):
                if project:
                    weight = modules[n].weight
                    weight.copy_((w_aligned[n].to(device) + projected[n]).to(weight.dtype))
        report = {
            "topology": topology,
            "update": "adapter scaling·B·A" if from_adapter else "W_finetuned − W_aligned",
            "projection": cfg.projection,
            "select_layers_type": cfg.select_layers_type,
            "threshold": cfg.threshold if cfg.select_layers_type == "threshold" else None,
            "num_proj_layers": cfg.num_proj_layers if cfg.select_layers_type == "number" else None,
            "layers": len(names),
            "projected": sum(chosen),
            "per_layer": [
                {"module": n, "similarity": round(s, 6), "projected": p}
                for n, s, p in zip(names, similarity, chosen, strict=True)
            ],
        }
        log.info("%s: safelora projected %d of %d layers", ctx.key, sum(chosen), len(names))
        return model, report
