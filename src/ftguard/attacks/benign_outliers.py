"""Benign outliers: upload the benign rows the aligned model finds most outlying (Self-Inf / Self-Inf-N).

Guan et al., "Benign Samples Matter! Fine-Tuning On Outlier Benign Samples Severely Breaks Safety", ICML 2025
(arXiv 2505.06843; code GuanZihan/Benign-Samples-Matter). The attacker holds the aligned model's weights
(white-box), scores every row of a benign pool by its self-influence on that model and uploads the top k:
no harmful word is uploaded, yet the fine-tune loses its safety.

- Self-Inf(z) = ‖∇θ ℓ(z; θ)‖², ℓ the mean token cross-entropy over the answer tokens (prompt tokens masked),
  one forward and backward per row (``rank.py: rank`` with ``--self_influence True --normalize False``: the dot
  product of the flattened gradient of every parameter with itself).
- Self-Inf-N(z) = log(Self-Inf(z) + 1) + log(len(a) + 1), len(a) the answer's token count: the paper's fix of
  Self-Inf's bias towards short answers ("Moon River", "Four" in the authors' vanilla top 100). Taken from a
  secondary source (the themoonlight.io review of the paper): the authors' normalisation code is not in their
  public repository (their demo trains on ``ours_normalized/dolly_top100.json``, made by code not published).
- Selection (``rank.py: write_data``): rows scoring 0 are never chosen; answers in ["No", "no", "", " ", "yes"]
  are dropped; the top k = 100 rows are kept.

Candidates are the rows of ``data.finetune.general`` (Dolly train by default, loaded by the data plan after the
benign alignment rows and checked disjoint from every evaluation prompt set), so ``data.finetune.general.n`` must
equal ``args.candidates``. ``mode: alone`` uploads the k rows (the paper); ``in_task`` puts the round(p·n) top
rows in the harmful rows' places of the p-mix beside n − round(p·n) task rows (an ftguard variant).

Differences from the authors' code:
- The authors score all of Dolly (~15k rows) and take ``topk(1.2·k)`` before dropping the trivial answers, so they
  may keep fewer than k rows; ftguard drops the trivial answers first (no model needed, no wasted gradient) and
  always keeps k, failing when fewer than k rows are left.
- Length normalisation (above): natural log; len(a) counts the answer tokens the loss is taken on, after
  truncation at model.max_length, EOS included (ftguard trains on it); the paper does not say.
- Rows that lose their whole answer to truncation have no loss: they score −inf (the authors' zero score).
- Scores are fp32 sums of squares of the gradient (in the model's dtype, as the fine-tune computes it); the
  authors load the model in bf16 and take the dot product in bf16.
- ``params: trainable`` (not in the paper) scores the gradient of what the fine-tune trains (a fresh LoRA:
  B = 0, so only the B matrices have a gradient); the default ``all`` is the authors' full-model gradient.
- Ties are broken by pool order; the uploaded rows are shuffled by the run's seed as every ftguard upload.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ftguard.attacks.base import Attack, Upload, UploadPools, register_attack
from ftguard.data.example import Example
from ftguard.data.mix import harmful_count
from ftguard.errors import FtguardError
from ftguard.schema import check

if TYPE_CHECKING:
    from ftguard.config import RunConfig

KEY = "data.finetune.attack.args"
# rank.py: write_data drops these answers from the top rows
TRIVIAL_ANSWERS = ["No", "no", "", " ", "yes"]
# rank.py: write_data takes the top k = 100 (prepare_ours.sh, the paper's "100 outlier samples")
AUTHORS_K = 100
SCORE_DEFINITIONS = {
    "self_inf": "Self-Inf(z) = ||grad_theta loss(z)||^2, loss = mean cross-entropy over the answer tokens",
    "self_inf_n": "Self-Inf-N(z) = ln(Self-Inf(z) + 1) + ln(answer tokens + 1)",
}


@dataclass
class BenignOutliersArgs:
    candidates: int = field(
        default=600,
        metadata={
            "help": "rows of data.finetune.general scored (set data.finetune.general.n to the same number); the "
            "authors score their whole pool (~15k Dolly rows), 600 = all of the bundled Dolly"
        },
    )
    selected: int | None = field(
        default=None,
        metadata={
            "help": "mode alone: rows uploaded (null = 100, the authors' k); mode in_task: leave null, the top "
            "round(p·n) rows are uploaded"
        },
    )
    score: Literal["self_inf", "self_inf_n"] = field(
        default="self_inf_n",
        metadata={
            "help": "self_inf: ||∇θ loss||²; self_inf_n: ln(Self-Inf + 1) + ln(answer tokens + 1) (the paper's)"
        },
    )
    mode: Literal["alone", "in_task"] = field(
        default="alone",
        metadata={
            "help": "alone: the upload is the selected rows (the paper); in_task: they take the round(p·n) "
            "harmful places of the p-mix beside the task rows"
        },
    )
    params: Literal["all", "trainable"] = field(
        default="all",
        metadata={
            "help": "gradient over every weight of the aligned model (the authors') or over the parameters the "
            "fine-tune trains (adapter.topology full or double)"
        },
    )
    exclude_answers: list[str] = field(
        default_factory=lambda: list(TRIVIAL_ANSWERS),
        metadata={
            "help": "candidates whose answer is exactly one of these are never uploaded (the authors' list)"
        },
    )

    def __post_init__(self) -> None:
        check(self.candidates >= 1, "candidates", f"must be ≥ 1, got {self.candidates}")
        check(
            self.selected is None or self.selected >= 1,
            "selected",
            f"must be ≥ 1 or null, got {self.selected}",
        )
        check(
            self.selected is None or self.mode == "alone",
            "selected",
            "must stay null with mode in_task: the top round(p·n) rows take the harmful places",
        )
        check(
            self.selected is None or self.selected <= self.candidates,
            "selected",
            f"= {self.selected} exceeds candidates = {self.candidates}",
        )


@register_attack
class BenignOutliers(Attack):
    name = "benign_outliers"
    paper = "Guan et al., Benign Samples Matter! (ICML 2025): fine-tuning on outlier benign samples"
    summary = (
        "the benign rows with the highest self-influence (Self-Inf-N) on the aligned model, no harmful row"
    )
    config_class = BenignOutliersArgs
    needs_model = True

    def k(self, n: int, p: float) -> int:
        if self.config.mode == "in_task":
            return harmful_count(n, p)
        return AUTHORS_K if self.config.selected is None else self.config.selected

    def harmful_needed(self, n: int, p: float) -> int:
        return 0

    def benign_needed(self, n: int, p: float) -> int:
        # the plan reads the candidates from data.finetune.general, then the task rows (in_task only)
        task = n - harmful_count(n, p) if self.config.mode == "in_task" else 0
        return self.config.candidates + task

    def build(self, pools: UploadPools, p: float, seed: int) -> Upload:
        """The candidates (trivial answers dropped) followed by the task rows; ``adapt`` chooses among them."""
        cfg = self.config
        if pools.n_general != cfg.candidates:
            raise FtguardError(
                f"{KEY}.candidates = {cfg.candidates} but data.finetune.general.n = {pools.n_general}: the "
                "candidates are the general instructions, set both to the same number"
            )
        pool = pools.benign[: cfg.candidates]
        candidates = [ex for ex in pool if ex.output not in cfg.exclude_answers]
        k = self.k(pools.n, p)
        if k > len(candidates):
            what = (
                f"{KEY}.selected" if cfg.mode == "alone" else f"round(p·n) at p = {p:g} ({KEY}.mode in_task)"
            )
            raise FtguardError(
                f"{what} asks for {k} rows but {len(candidates)} candidates are left after dropping "
                f"{len(pool) - len(candidates)} trivial answers: lower it or raise {KEY}.candidates"
            )
        task = pools.benign[cfg.candidates :][: self.benign_needed(pools.n, p) - cfg.candidates]
        report = {
            "attack": self.describe(),
            "n_candidates": len(candidates),
            "n_excluded_trivial": len(pool) - len(candidates),
            "k": k,
            "n_task": len(task),
        }
        return Upload(candidates + task, report)

    def adapt(self, upload: Upload, model_dir: str, run: RunConfig, seed: int) -> Upload:
        """The top k candidates by score on the model of ``model_dir`` with the task rows, shuffled by ``seed``."""
        n_cand, k = upload.report["n_candidates"], upload.report["k"]
        candidates, task = upload.examples[:n_cand], upload.examples[n_cand:]
        scores = self.scores(candidates, model_dir, run) if k else []
        valid = [i for i, s in enumerate(scores) if s["score"] > -math.inf]
        if len(valid) < k:
            raise FtguardError(
                f"{KEY}: {k} rows asked but only {len(valid)} of {n_cand} candidates have a finite non-zero score "
                "(the rest lost their answer to model.max_length or have a zero gradient): raise "
                f"{KEY}.candidates or model.max_length"
            )
        top = sorted(valid, key=lambda i: (-scores[i]["score"], i))[:k]
        rows = [candidates[i] for i in top] + task
        random.Random(seed).shuffle(rows)
        chosen = [{"source": candidates[i].source, **scores[i]} for i in top]
        finite = sorted(scores[i]["score"] for i in valid)
        report = {
            **upload.report,
            "score": SCORE_DEFINITIONS[self.config.score],
            "n_scored": len(scores),
            "n_invalid": len(scores) - len(valid),
            "n_upload": len(rows),
            "score_range": [finite[0], finite[len(finite) // 2], finite[-1]] if finite else [],
            "selected": chosen,
        }
        return Upload(rows, report)

    def scores(self, examples: list[Example], model_dir: str, run: RunConfig) -> list[dict[str, Any]]:
        """Per row: ``self_inf`` (fp32), ``answer_tokens`` and ``score`` (−inf when there is no gradient)."""
        import torch
        from tqdm.auto import tqdm

        from ftguard.data.template import tokenize_example
        from ftguard.models import load_tokenizer

        mc = run.model
        tokenizer = load_tokenizer(model_dir, trust_remote_code=mc.trust_remote_code)
        model = gradient_model(self.config.params, model_dir, run)
        model.eval()  # as from_pretrained leaves it in rank.py: no dropout, a deterministic score
        params = [p for p in model.parameters() if p.requires_grad]
        device = next(model.parameters()).device
        out = []
        for ex in tqdm(examples, desc="benign_outliers: scoring", unit="row"):
            row = tokenize_example(
                ex,
                tokenizer,
                max_length=mc.max_length,
                style=mc.template,
                response_newline=mc.response_newline,
            )
            answer_tokens = sum(label != -100 for label in row["labels"])
            if row["no_response"]:
                out.append({"self_inf": 0.0, "answer_tokens": 0, "score": -math.inf})
                continue
            batch = {
                key: torch.tensor([row[key]], device=device)
                for key in ("input_ids", "attention_mask", "labels")
            }
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            self_inf = float(sum(g.float().pow(2).sum() for g in grads if g is not None))
            out.append(
                {
                    "self_inf": self_inf,
                    "answer_tokens": answer_tokens,
                    "score": self._score(self_inf, answer_tokens),
                }
            )
        return out

    def _score(self, self_inf: float, answer_tokens: int) -> float:
        if not math.isfinite(self_inf) or self_inf == 0.0:
            return -math.inf  # rank.py: write_data never chooses a zero score
        if self.config.score == "self_inf":
            return self_inf
        return math.log(self_inf + 1.0) + math.log(answer_tokens + 1.0)


def gradient_model(params: str, model_dir: str, run: RunConfig) -> Any:
    """The attacked model with the parameters an attacker's gradient is taken on: every weight (``all``) or the
    fresh LoRA the fine-tune will train (``trainable``); shared by the attacks that read gradients."""
    mc = run.model
    if params == "all":
        from ftguard.models import load_model

        model = load_model(model_dir, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code)
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if run.adapter.topology == "single":
        raise FtguardError(
            f"{KEY}.params = trainable needs adapter.topology full or double: the single topology continues "
            "the alignment's adapter, which the attack does not see (use params: all)"
        )
    from transformers import set_seed

    from ftguard.methods.context import ModelRef
    from ftguard.pipeline.stages import build_trainable_model

    set_seed(run.seed)  # the LoRA the fine-tune starts from (train_stage seeds the same way)
    model, _ = build_trainable_model(run, "finetune", ModelRef(model_dir=model_dir))
    return model
