"""Virus: harmful rows rewritten token by token to pass the provider's moderation guard while their training
gradient stays close to the original's.

Huang et al., "Virus: Harmful Fine-tuning Attack for Large Language Models Bypassing Guardrail Moderation"
(arXiv 2501.17433; code git-disl/Virus, ``trainer.py: MetaAttackTrainer``). The upload is the p-mix; each harmful
row's answer tokens x are optimised GCG-style on the aligned model (white-box) to minimise

    L(x) = (1 − λ) · L_sim(x) + λ · L_guard(x),   L_sim(x) = −Σ_θ <g(x), g(x₀)> / ‖g(x)‖

g(x) = ∇θ CE(victim; row with answer x) on the parameters the fine-tune trains, x₀ the original answer (g(x₀) is
taken once, detached; ‖g(x)‖ counts as a constant in the token gradient, as the authors' ``no_grad`` norm),
L_guard = −ln P(safe) = −ln(1 − p_harm) with p_harm the guard's probability of harm on (prompt, answer).
Each step: the gradient of L_sim w.r.t. the answer's one-hot tokens (through g, second order) gives the top_k
tokens per position; ``candidates`` distinct (position, rank) single-token swaps are drawn (seeded); every
candidate, decoded to text, is scored exactly by L and the best of them and the current answer is kept.

Differences from the authors' code (and why):
- Guard: ftguard's moderation filter (``methods/filter.py``), default judge ``ftguard-judge`` (MiniLM heads),
  not Llama Guard 2. Its tokenizer is not the victim's, so L_guard cannot be differentiated through the victim's
  one-hot (the authors feed the same one-hot to Llama Guard, which shares Llama-3's vocabulary): candidates come
  from the gradient of L_sim only, and L_guard enters the exact score of each candidate. p_harm is the judge's
  ``Verdict.score``; judges without a score (``keyword``) give 1 when flagged, 0 otherwise, with P(safe) floored
  at 1e-6 (L_guard ≤ 13.8). The guard sees what the filter sees: the prompt as asked and the answer, so answers
  the judges call degenerate (empty, one word, repeated) pass, as they pass the filter.
- The row: the authors append the whole templated harmful sample (prompt and answer) as trained tokens after one
  benign task sample, the reference gradient being that of benign ⊕ original harmful sample, and upload
  benign ⊕ optimised ⊕ benign. ftguard uploads (instruction, answer) text rows and keeps the p-mix's shape: the
  harmful row keeps its prompt (masked from the loss in ftguard's training, and how the filter's report
  recognises harmful rows) and its answer is optimised; the reference gradient is the original row's.
- Text round trip: the authors keep token ids; ftguard uploads text, so each candidate is decoded and
  re-tokenised exactly as training tokenises it before it is scored (the score is that of the row trained).
  Only answer tokens inside model.max_length are swapped; tokens past it are kept.
- Parameters: ``trainable`` (default) is the authors' choice, g on what the fine-tune trains (theirs: the
  alignment LoRA on q,k,v, fine-tuned further); in ftguard that is the fine-tune's fresh LoRA (double topology,
  B = 0 so only B has a gradient) or every weight (full); ``all`` takes every weight of the aligned model, and
  then the token gradient also counts that the one-hot picks which embedding rows get a gradient (exact).
- Illegal tokens: as the authors (decoding not printable ASCII, special tokens), plus embedding rows the
  tokenizer cannot decode. Ties keep the earlier candidate (the current answer first). Model in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ftguard.attacks.base import Attack, Upload, UploadPools, register_attack
from ftguard.attacks.benign_outliers import gradient_model
from ftguard.data.example import Example
from ftguard.data.mix import build_harmful_mix
from ftguard.schema import ConfigError, check

if TYPE_CHECKING:
    import torch

    from ftguard.config import RunConfig

KEY = "data.finetune.attack.args"
MIN_P_SAFE = 1e-6  # floor of P(safe) for judges without a probability: L_guard stays finite


@dataclass
class VirusArgs:
    # script/attack/virus.sh: --num_train_epochs 50 on one benign sample = 50 GCG iterations per harmful row
    steps: int = field(default=50, metadata={"help": "GCG iterations per harmful row (authors: 50)"})
    # script/attack/virus.sh, batch_virus.sh: --virus_topk 64 (train.py's default 256 is not used by the runs)
    top_k: int = field(default=64, metadata={"help": "tokens proposed per position (authors: 64)"})
    # script/attack/virus.sh, batch_virus.sh: --virus_bs 128 (train.py's default 512 is not used by the runs)
    candidates: int = field(
        default=128, metadata={"help": "single-token swaps scored per step (authors: 128)"}
    )
    # virus.sh lamb=${2:-0.1}, batch_virus.sh lamb=${1:-0.1}, the fine-tuning scripts' suffix files _lamb_0.1
    lam: float = field(
        default=0.1, metadata={"help": "λ: weight of the guard loss, 1 − λ that of gradient similarity (0.1)"}
    )
    # batch_virus.sh optimises every poisoned row (total_items=50 = poison_num); null does the same
    max_rows: int | None = field(
        default=None,
        metadata={
            "help": "harmful rows optimised (the first in pool order); the rest are uploaded as they are"
        },
    )
    judge: str = field(
        default="ftguard-judge",
        metadata={"help": "the guard the attacker evades (the filter method's default judge)"},
    )
    judge_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "options of the judge"})
    params: Literal["trainable", "all"] = field(
        default="trainable",
        metadata={
            "help": "gradient over the parameters the fine-tune trains (the authors': their trained LoRA) or "
            "over every weight of the aligned model"
        },
    )

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", f"must be ≥ 0, got {self.steps}")
        check(self.top_k >= 1, "top_k", f"must be ≥ 1, got {self.top_k}")
        check(self.candidates >= 1, "candidates", f"must be ≥ 1, got {self.candidates}")
        check(0.0 <= self.lam <= 1.0, "lam", f"must be in [0, 1], got {self.lam}")
        check(
            self.max_rows is None or self.max_rows >= 0,
            "max_rows",
            f"must be ≥ 0 or null, got {self.max_rows}",
        )
        from ftguard.evaluation.judges import check_judge

        try:
            check_judge(self.judge, self.judge_options, "judge")
        except ConfigError as exc:
            check(False, "judge", str(exc).removeprefix("judge: "))


@dataclass
class _State:
    """One answer as the fine-tune would train it, with its exact objective."""

    text: str
    objective: float
    sim: float
    p_harm: float
    flagged: bool


@register_attack
class Virus(Attack):
    name = "virus"
    paper = "Huang et al., Virus (arXiv 2501.17433): harmful fine-tuning bypassing guardrail moderation"
    summary = "harmful answers rewritten GCG-style to pass the moderation guard with their gradient kept"
    config_class = VirusArgs
    needs_model = True

    def build(self, pools: UploadPools, p: float, seed: int) -> Upload:
        """The p-mix; the report lists the harmful rows' positions in pool order for ``adapt``."""
        examples, mix = build_harmful_mix(pools.benign, pools.harmful, n=pools.n, p=p, seed=seed)
        where = {id(ex): i for i, ex in enumerate(examples)}
        harmful_rows = [where[id(ex)] for ex in pools.harmful[: mix.n_harmful]]
        return Upload(examples, {**mix.as_dict(), "attack": self.describe(), "harmful_rows": harmful_rows})

    def adapt(self, upload: Upload, model_dir: str, run: RunConfig, seed: int) -> Upload:
        from tqdm.auto import tqdm

        from ftguard.evaluation.judges import get_judge

        cfg = self.config
        rows = upload.report["harmful_rows"]
        chosen = set(rows if cfg.max_rows is None else rows[: cfg.max_rows])
        judge = get_judge(cfg.judge, **cfg.judge_options)
        examples = list(upload.examples)
        per_row, flags_before, flags_after = [], [], []
        if chosen:
            victim = _Victim(gradient_model(cfg.params, model_dir, run), model_dir, run)
        # minutes per row on a CPU: a bar over every row's steps
        with tqdm(total=len(chosen) * cfg.steps, desc="virus: optimising harmful rows", unit="step") as bar:
            for k, i in enumerate(rows):
                ex = examples[i]
                if i not in chosen:
                    (verdict,) = judge.verdicts([_asked(ex)], [ex.output])
                    flags_before.append(verdict.harmful)
                    flags_after.append(verdict.harmful)
                    continue
                new, info = self.optimise(ex, victim, judge, seed=seed * 1_000_003 + k, on_step=bar.update)
                steps_done = len(info.get("objective", [0])) - 1  # the trace starts with the unchanged row
                bar.update(cfg.steps - steps_done)  # the steps a row stopped short of, or skipped
                examples[i] = new
                per_row.append(info)
                flags_before.append(info["flagged_before"])
                flags_after.append(info["flagged_after"])
        n = len(rows)
        report = {
            **upload.report,
            "guard": judge.describe(),
            "objective": "(1-lam)*(-sum <g(x), g(x0)> / ||g(x)||) + lam*(-ln(1 - p_harm))",
            "n_harmful": n,
            "n_optimised": len(per_row),
            # the paper's leakage ratio is 1 − the harmful rows' flag rate
            "flag_rate_before": sum(flags_before) / n if n else 0.0,
            "flag_rate_after": sum(flags_after) / n if n else 0.0,
            "rows": per_row,
        }
        return Upload(examples, report)

    def optimise(
        self, ex: Example, victim: _Victim, judge: Any, seed: int, on_step: Callable[[], Any] = lambda: None
    ) -> tuple[Example, dict[str, Any]]:
        """The row with its answer optimised, and what happened (before/after, the kept objective per step)."""
        import torch

        cfg = self.config
        reference = victim.gradient(ex)
        if reference is None:  # no answer token within model.max_length: nothing to optimise
            (verdict,) = judge.verdicts([_asked(ex)], [ex.output])
            info = {"source": ex.source, "skipped": "no answer token within model.max_length"}
            return ex, {**info, "flagged_before": verdict.harmful, "flagged_after": verdict.harmful}
        scored: dict[str, _State] = {}

        def score(texts: list[str]) -> None:
            new = [t for t in dict.fromkeys(texts) if t not in scored]
            if not new:
                return
            verdicts = judge.verdicts([_asked(ex)] * len(new), new)
            for text, verdict in zip(new, verdicts, strict=True):
                p_harm = verdict.score if verdict.score is not None else float(verdict.harmful)
                guard = -math.log(max(1.0 - p_harm, MIN_P_SAFE))
                sim = victim.similarity(_with(ex, text), reference)
                objective = (1.0 - cfg.lam) * sim + cfg.lam * guard
                scored[text] = _State(text, objective, sim, p_harm, verdict.harmful)

        score([ex.output])
        current = first = scored[ex.output]
        trace = [current.objective]
        generator = torch.Generator().manual_seed(seed)
        for _ in range(cfg.steps):
            ids, span, grad = victim.token_gradient(_with(ex, current.text), reference)
            if span == 0:  # the answer decoded to no token: nothing left to swap
                break
            top = (-grad).topk(min(cfg.top_k, victim.n_legal), dim=1).indices
            pairs = _distinct_pairs(span, top.shape[1], cfg.candidates, generator)
            texts = [current.text]
            for pos, rank in pairs:
                swapped = list(ids)
                swapped[pos] = int(top[pos, rank])
                texts.append(victim.decode(swapped))
            score(texts)
            current = min((scored[t] for t in texts), key=lambda s: s.objective)  # first of the ties
            trace.append(current.objective)
            on_step()
        info = {
            "source": ex.source,
            "flagged_before": first.flagged,
            "flagged_after": current.flagged,
            "p_harm_before": first.p_harm,
            "p_harm_after": current.p_harm,
            "similarity_before": first.sim,
            "similarity_after": current.sim,
            "objective": trace,
        }
        return _with(ex, current.text, source=f"{ex.source}+virus"), info


class _Victim:
    """The aligned model as the fine-tune starts from it: gradients of one row's training loss."""

    def __init__(self, model: Any, model_dir: str, run: RunConfig) -> None:
        from ftguard.models import load_tokenizer

        self.model, self.mc = model, run.model
        self.model.eval()  # no dropout: an exact, repeatable score
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code=run.model.trust_remote_code)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.embed = model.get_input_embeddings()
        self.illegal = self._illegal_tokens()
        self.n_legal = int((~self.illegal).sum())

    def _illegal_tokens(self) -> torch.Tensor:
        import torch

        vocab = self.embed.weight.shape[0]
        illegal = torch.ones(vocab, dtype=torch.bool)
        special = set(self.tokenizer.all_special_ids)
        for i in range(min(vocab, len(self.tokenizer))):
            text = self.tokenizer.decode([i])
            illegal[i] = i in special or not (text.isascii() and text.isprintable())
        return illegal

    def decode(self, answer_ids: list[int]) -> str:
        return self.tokenizer.decode(answer_ids, skip_special_tokens=True)

    def _row(self, ex: Example) -> tuple[dict[str, torch.Tensor], list[int], int] | None:
        """The training row's tensors, the answer's ids and how many of them fit in model.max_length."""
        import torch

        from ftguard.data.template import IGNORE_INDEX, tokenize_example

        row = tokenize_example(
            ex, self.tokenizer, max_length=self.mc.max_length, style=self.mc.template,
            response_newline=self.mc.response_newline,
        )  # fmt: skip
        if row["no_response"]:
            return None
        answer = list(self.tokenizer(ex.output, add_special_tokens=False)["input_ids"])
        n_prompt = sum(label == IGNORE_INDEX for label in row["labels"])
        fits = min(len(answer), len(row["input_ids"]) - n_prompt)
        device = self.embed.weight.device
        batch = {k: torch.tensor([row[k]], device=device) for k in ("input_ids", "attention_mask", "labels")}
        return batch, answer, fits

    def gradient(
        self, ex: Example, create_graph: bool = False, embeds: Any = None
    ) -> list[torch.Tensor] | None:
        import torch

        row = self._row(ex)
        if row is None:
            return None
        batch = row[0]
        inputs = {"input_ids": batch["input_ids"]} if embeds is None else {"inputs_embeds": embeds}
        loss = self.model(**inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)]

    def similarity(self, ex: Example, reference: list[torch.Tensor]) -> float:
        """L_sim = −Σ <g, g₀> / ‖g‖ (0 when the row has no gradient), in float64."""
        grads = self.gradient(ex)
        if grads is None:
            return 0.0
        return float(_sim(grads, reference))

    def token_gradient(
        self, ex: Example, reference: list[torch.Tensor]
    ) -> tuple[list[int], int, torch.Tensor]:
        """The answer's ids, how many can be swapped, and ∂L_sim/∂one-hot on those (illegal tokens +inf)."""
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        batch, answer, fits = self._row(ex)  # type: ignore[misc]  (the current answer always has tokens)
        start = int((batch["labels"][0] == -100).sum())
        weight = self.embed.weight
        onehot = torch.nn.functional.one_hot(batch["input_ids"][0, start : start + fits], weight.shape[0])
        onehot = onehot.to(weight.dtype).requires_grad_(True)
        base = self.embed(
            batch["input_ids"]
        )  # not detached: with params all, g holds the embedding's gradient
        embeds = torch.cat([base[:, :start], (onehot @ weight)[None], base[:, start + fits :]], dim=1)
        # the fused CPU/GPU attention kernels have no double backward: the math kernel, as the authors force
        with sdpa_kernel(SDPBackend.MATH):
            grads = self.gradient(ex, create_graph=True, embeds=embeds)
        (grad,) = torch.autograd.grad(_sim(grads, reference), onehot)
        grad = grad.detach().float()
        grad[:, self.illegal] = math.inf
        return answer, fits, grad


def _sim(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    import torch

    norm = torch.sqrt(sum(g.detach().double().pow(2).sum() for g in grads))
    dot = sum((g.double() * r.double()).sum() for g, r in zip(grads, reference, strict=True))
    return -dot / norm if norm > 0 else dot * 0.0


def _distinct_pairs(span: int, k: int, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """``count`` distinct (position, rank) pairs, uniform over span × k (the authors' get_resample_ids)."""
    import torch

    count = min(count, span * k)
    seen: dict[tuple[int, int], None] = {}
    while len(seen) < count:
        pos = torch.randint(span, (count,), generator=generator).tolist()
        rank = torch.randint(k, (count,), generator=generator).tolist()
        for pair in zip(pos, rank, strict=True):
            if len(seen) < count:
                seen.setdefault(pair)
    return list(seen)


def _asked(ex: Example) -> str:
    from ftguard.methods.filter import _as_asked

    return _as_asked(ex)


def _with(ex: Example, output: str, source: str | None = None) -> Example:
    return Example(ex.instruction, output, ex.input, ex.source if source is None else source)
