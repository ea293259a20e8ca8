"""RepNoise: Representation Noising (Rosati et al., NeurIPS 2024), as the Booster repo's baseline
(docs/methods.md, RepNoise).

Differences from the original code (``git-disl/Booster`` ``loss_func/repnoise_loss.py``, itself a copy of
``domenicrosati/representation-noising`` ``loss.py``), each because the original is a bug or is ill-defined
for unpaired batches; none changes the objective (docs/methods.md, RepNoise):

* Token mask. The original compares the harmful ids with the harmless ids zero-padded/truncated to the
  harmful shape, so harmful *padding* positions count as "differing" (the CE then trains on pad tokens and the
  MMD sees padding activations), and a harmful token id 0 facing harmless zero-padding counts as equal. Here
  a harmful position is kept iff it is a real token (attention mask 1) and the harmless batch has no real token
  with the same id at the same (row, column); harmless padding and positions beyond the harmless batch's rows
  or length count as different. Both batches are right-padded (``CausalLMCollator``), so columns line up from
  the first token: with the shared Alpaca template the common prefix is masked out, as in the original.
* Masked CE. The original multiplies the *logits* at position t by mask[t] and drops every label equal to
  token id 0, so the first differing token after a shared prefix is "predicted" from all-zero logits (a constant
  log V with no gradient) and genuine token-0 labels vanish. Here position t (predicting token t+1) counts iff
  token t+1 is kept, with the model's real logits; the CE is the token mean over those positions (as the
  original's ``CrossEntropyLoss``).
* Mean over CE terms. The original sums the CE of the logits and of the L+1 hidden states (L+2 terms) but
  divides by L+1; here it is the mean over the L+2 terms, a factor (L+2)/(L+1) inside the log.
  As in the original, HF's last hidden state is already normalised and is passed through the final norm again.
* Retain loss. The original's harmless term is the same masked input-id CE on the harmless batch;
  ``retain_loss: response`` (default, the objective's "CE(harmless)") uses the stage's SFT loss on response
  tokens, so that α = β = 0 is SFT; ``retain_loss: masked_input_ids`` reproduces the original term.
* Gradient accumulation and DDP scaling are the Trainer's (the original divided only the reported loss).
* Pairing. Rosati et al.'s ``datasets.py`` builds the refusals and the harmful answers from the same BeaverTails
  rows, so row i of both batches answers one question and the mask drops exactly the shared prompt; Booster's
  copy draws the harmful batch at random. The default follows Booster's (the comparison ftguard reproduces);
  ``harmful_pairing: paired`` is Rosati et al.'s, with unpaired rows where the alignment row has no harmful
  counterpart (the benign half of a helpful-and-harmless mix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.hooks import decoder_parts
from ftguard.training.trainer import FtguardTrainer

if TYPE_CHECKING:
    from datasets import Dataset

    from ftguard.methods.context import StageContext


@dataclass
class RepNoiseConfig:
    # α = 0.1 (the Booster script's --rho), β = 0.001 (--lamb); docs/methods.md, RepNoise.
    alpha: float = field(
        default=0.1,
        metadata={"help": "weight α of −log(1 + harmful CE), the gradient-ascent term (Booster's --rho)"},
    )
    beta: float = field(
        default=0.001,
        metadata={
            "help": "weight β of the MMD between harmful MLP outputs and Gaussian noise (Booster's --lamb)"
        },
    )
    # The original's harmful batch had the alignment batch's size (bs 5); null keeps that coupling.
    harmful_batch_size: int | None = field(
        default=None,
        metadata={"help": "harmful batch size; null = the stage's per-device batch size (as the original)"},
    )
    # docs/methods.md, RepNoise calls the harmless term CE(harmless); the original code's is an option.
    retain_loss: Literal["response", "masked_input_ids"] = field(
        default="response",
        metadata={
            "help": "harmless term: 'response' = the SFT loss on response tokens; 'masked_input_ids' = the original "
            "code's CE on the harmless input ids where they differ from the harmful batch's"
        },
    )
    # Booster's copy (which ftguard follows) draws the harmful batch at random; Rosati et al.'s own code zips the
    # refusals with the harmful answers to the same questions, so that the token mask drops the shared prompt.
    harmful_pairing: Literal["unpaired", "paired"] = field(
        default="unpaired",
        metadata={
            "help": "'unpaired' = a random harmful batch (the Booster repo's baseline); 'paired' = row i is the "
            "harmful answer to row i's prompt where the alignment set has one (Rosati et al.'s code), else row i "
            "of the random batch"
        },
    )
    # Beyond the paper: every hidden state's read-out through a 49k-token head is what makes RepNoise ~10× SFT
    # on SmolLM2 (docs/methods.md, RepNoise, Cost). The sampled estimate is an approximation, off by default.
    readout: Literal["exact", "sampled"] = field(
        default="exact",
        metadata={
            "help": "layer-wise harmful CE: 'exact' = full softmax over the vocabulary (the paper); 'sampled' = "
            "sampled-softmax estimate over readout_negatives tokens (an approximation, much cheaper)"
        },
    )
    readout_negatives: int = field(
        default=1024,
        metadata={"help": "vocabulary tokens drawn per step for readout: sampled (≥ the vocabulary = exact)"},
    )
    # Gaussian kernel, 5 bandwidths spaced by a factor of 2 (the original MMD_loss defaults).
    kernel_num: int = field(default=5, metadata={"help": "number of Gaussian kernel bandwidths in the MMD"})
    kernel_mul: float = field(default=2.0, metadata={"help": "ratio between consecutive MMD bandwidths"})

    def __post_init__(self) -> None:
        check(self.alpha >= 0, "alpha", f"must be ≥ 0, got {self.alpha}")
        check(self.beta >= 0, "beta", f"must be ≥ 0, got {self.beta}")
        check(
            self.harmful_batch_size is None or self.harmful_batch_size >= 1,
            "harmful_batch_size",
            f"must be ≥ 1 or null, got {self.harmful_batch_size}",
        )
        check(self.readout_negatives >= 1, "readout_negatives", f"must be ≥ 1, got {self.readout_negatives}")
        check(self.kernel_num >= 1, "kernel_num", f"must be ≥ 1, got {self.kernel_num}")
        check(self.kernel_mul > 0, "kernel_mul", f"must be > 0, got {self.kernel_mul}")


# ---------------------------------------------------------------------------------------------- loss pieces


def gaussian_mmd(
    source: torch.Tensor, target: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5
) -> torch.Tensor:
    """Biased MMD² between two equally sized samples [n, D] with a multi-bandwidth Gaussian kernel.

    k(a, b) = Σ_i exp(−‖a − b‖² / (σ·mul^i)), i = 0…num−1, with σ = mean pairwise squared distance over the
    pooled sample (off-diagonal, no gradient) divided by mul^(num // 2), so the bandwidths centre on it.
    Returns mean(K_xx + K_yy − K_xy − K_yx), as the original ``MMD_loss``. Computed in fp32.
    """
    if source.shape != target.shape:
        raise ValueError(
            f"MMD samples must have the same shape, got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    n = source.shape[0]
    with torch.autocast(device_type=source.device.type, enabled=False):
        total = torch.cat([source, target]).float()
        sq = (total * total).sum(dim=1)
        # The Gram form keeps memory at O(n·D); the diagonal is exactly zero by definition.
        off_diag = 1.0 - torch.eye(2 * n, device=total.device, dtype=total.dtype)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * total @ total.T).clamp_min(0.0) * off_diag
        pairs = (2 * n) * (2 * n) - 2 * n
        bandwidth = d2.detach().sum() / max(pairs, 1) / kernel_mul ** (kernel_num // 2)
        # Identical points everywhere (e.g. an all-masked batch): every kernel is 1 and the MMD is 0.
        bandwidth = bandwidth.clamp_min(torch.finfo(total.dtype).tiny)
        kernels = sum(torch.exp(-d2 / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
        xx, yy = kernels[:n, :n], kernels[n:, n:]
        xy, yx = kernels[:n, n:], kernels[n:, :n]
        return (xx + yy - xy - yx).mean()


def differing_token_mask(
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    other_ids: torch.Tensor,
    other_attention_mask: torch.Tensor,
) -> torch.Tensor:
    """[B, T] bool: real tokens of ``ids`` whose id differs from ``other_ids`` at the same (row, column).

    Positions where the other batch has padding, fewer rows or fewer columns count as different.
    """
    rows, cols = ids.shape
    other = torch.full_like(ids, -1)  # -1 is no token id
    r, c = min(rows, other_ids.shape[0]), min(cols, other_ids.shape[1])
    other_real = other_attention_mask[:r, :c].bool()
    other[:r, :c] = torch.where(other_real, other_ids[:r, :c], torch.full_like(other_ids[:r, :c], -1))
    return (ids != other) & attention_mask.bool()


def masked_next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean CE of predicting ``ids[:, t+1]`` from ``logits[:, t]`` over the positions with ``mask[:, t+1]``.

    Zero when no position is kept.
    """
    keep = mask[:, 1:]
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep])


def sampled_readout_ce(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Sampled-softmax estimate of the mean CE of ``head(hidden)`` [N, V] against ``labels`` [N].

    With S the drawn token ids (distinct, uniform), each position's partition function is estimated as
    Z ≈ exp(s_y) + (V − 1)/m · Σ_{k ∈ S, k ≠ y} exp(s_k), m = |S ∖ {y}|: unbiased for Z, so log Z (and the CE)
    is biased low by Jensen's gap, which shrinks as |S| grows. S = the whole vocabulary gives the exact CE.
    Costs N·|S| logits instead of N·V.
    """
    weight = head.weight.float()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    h = hidden.float()
    target = (h * weight[labels]).sum(-1)
    sampled = h @ weight[negatives].T
    if bias is not None:
        target, sampled = target + bias[labels], sampled + bias[negatives]
    is_target = negatives[None, :] == labels[:, None]
    others = (negatives.numel() - is_target.sum(-1)).clamp_min(1)
    log_weight = torch.log((weight.shape[0] - 1) / others.float())
    sampled = sampled.masked_fill(is_target, float("-inf")) + log_weight[:, None]
    log_z = torch.logsumexp(torch.cat([target[:, None], sampled], dim=-1), dim=-1)
    return (log_z - target).mean()


def prompt_key(ids, attention_mask, labels) -> tuple[int, ...]:
    """The prompt's token ids of one (right-padded) training row: its real tokens before the first label.

    A refusal and the harmful answer to the same question, formatted by the same template, share this key.
    """
    ids, labels = [int(t) for t in ids], [int(t) for t in labels]
    real = sum(int(m) for m in attention_mask)
    start = next((t for t in range(real) if labels[t] != -100), real)
    return tuple(ids[:start])


# ---------------------------------------------------------------------------------------------- trainer


class RepNoiseTrainer(FtguardTrainer):
    """Each step, with the stage's (harmless, alignment) batch x and a random harmful batch x′ of the same prompts
    pool's harmful answers (unpaired):

    1. Forward x: retain loss R = the SFT loss on x (or, optionally, the original's masked input-id CE).
    2. Mask: the real tokens of x′ whose id differs from x's at the same position.
    3. Forward x′ with ``output_hidden_states`` and forward hooks on every decoder layer's MLP.
    4. N = mean_l MMD(masked MLP output of layer l, masked N(0, 1) noise), each sequence flattened to one vector.
    5. H = mean over [final logits, LM head(final norm(h)) for every hidden state h] of the masked CE on x′'s
       input ids (prompt included).
    6. Loss = R + β·N − α·log(1 + H); the Trainer does the backward, GA scaling and the DDP reduce.

    Two forwards, one backward per micro-batch (the graph of both forwards).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation reports the plain SFT loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        cfg: RepNoiseConfig = self.method_config

        # 1. Retain loss on the harmless (alignment) batch.
        if cfg.retain_loss == "response":
            retain, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        else:
            outputs = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            )

        # 2. Token mask of the harmful batch.
        harmful = self.harmful_batch(inputs)
        h_ids, h_attn = harmful["input_ids"], harmful["attention_mask"]
        mask = differing_token_mask(h_ids, h_attn, inputs["input_ids"], inputs["attention_mask"])
        if cfg.retain_loss == "masked_input_ids":
            # The original's harmless term: the same masked CE, with the roles of the two batches swapped.
            retain_mask = differing_token_mask(inputs["input_ids"], inputs["attention_mask"], h_ids, h_attn)
            retain = masked_next_token_ce(outputs.logits, inputs["input_ids"], retain_mask)

        # 3. One forward on the harmful batch gives the MLP outputs (hooks) and the hidden states.
        mlps, norm, head = decoder_parts(model, "repnoise")
        captured: list[torch.Tensor | None] = [None] * len(mlps)

        def make_hook(i: int):
            def hook(_module, _args, output):
                captured[i] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(mlps)]
        try:
            h_out = model(input_ids=h_ids, attention_mask=h_attn, output_hidden_states=True, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if any(a is None for a in captured):
            raise FtguardError("repnoise: an MLP forward hook did not fire on the harmful forward pass")

        # 4. MMD of each layer's masked MLP outputs against masked standard Gaussian noise.
        act_mask = mask.unsqueeze(-1)
        mmd_terms = []
        for act in captured:
            act = act.float() * act_mask
            noise = torch.randn_like(act) * act_mask
            mmd_terms.append(gaussian_mmd(act.flatten(1), noise.flatten(1), cfg.kernel_mul, cfg.kernel_num))
        mmd = torch.stack(mmd_terms).mean()

        # 5. Masked CE on the harmful input ids, from the logits and from every hidden state.
        keep = mask[:, 1:]
        ce_terms = [masked_next_token_ce(h_out.logits, h_ids, mask)]
        if keep.any():
            labels = h_ids[:, 1:][keep]

            if cfg.readout == "sampled":
                vocab = head.weight.shape[0]
                negatives = torch.randperm(vocab, device=labels.device)[: cfg.readout_negatives]

                def head_ce(h: torch.Tensor) -> torch.Tensor:
                    return sampled_readout_ce(norm(h), head, labels, negatives)

            else:

                def head_ce(h: torch.Tensor) -> torch.Tensor:
                    return F.cross_entropy(head(norm(h)).float(), labels)

            for hidden in h_out.hidden_states:
                selected = hidden[:, :-1][keep]  # norm and head act per position: select first
                # Recomputing the [N, vocab] logits in backward avoids holding one such tensor per layer.
                ce_terms.append(
                    checkpoint(head_ce, selected, use_reentrant=False)
                    if torch.is_grad_enabled()
                    else head_ce(selected)
                )
        else:
            ce_terms += [h_out.logits.sum() * 0.0] * len(h_out.hidden_states)
        harmful_ce = torch.stack(ce_terms).mean()

        # 6. Combine. The extra terms are per-micro-batch means: scale them like the retain loss will be scaled.
        # When the Trainer leaves the division by the accumulation steps to compute_loss (the SFT loss is then
        # normalised over the window's tokens), every per-micro-batch mean must be divided here, including the
        # original's masked input-id retain term.
        extra = cfg.beta * mmd - cfg.alpha * torch.log1p(harmful_ce)
        window = self.loss_normalised_over_window(num_items_in_batch)
        if cfg.retain_loss == "response":
            loss = retain + self.scale_extra(extra, num_items_in_batch)
        else:
            loss = self.scale_extra(retain + extra, num_items_in_batch)

        response_window = window and cfg.retain_loss == "response"
        self.record(
            repnoise_retain_loss=self._batch_retain_loss(outputs.logits, inputs)
            if response_window
            else retain,
            repnoise_mmd=mmd,
            repnoise_harmful_ce=harmful_ce,
        )
        return (loss, outputs) if return_outputs else loss

    def harmful_batch(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's harmful batch: the random stream's next batch, with row i replaced, in paired mode, by the
        harmful answer to the prompt of the alignment batch's row i where there is one (benign rows of a
        helpful-and-harmless mix have none). The stream is drawn either way, so both modes resume alike."""
        cfg: RepNoiseConfig = self.method_config
        unpaired = self.aux_batch("harmful", cfg.harmful_batch_size)
        if cfg.harmful_pairing == "unpaired":
            return unpaired
        dataset, by_prompt = self.aux_datasets["harmful"], self._harmful_by_prompt()
        rows, paired = [], 0
        for i in range(unpaired["input_ids"].shape[0]):
            j = None
            if i < inputs["input_ids"].shape[0]:
                j = by_prompt.get(
                    prompt_key(inputs["input_ids"][i], inputs["attention_mask"][i], inputs["labels"][i])
                )
            if j is None:
                real = unpaired["attention_mask"][i].bool()
                rows.append(
                    {k: unpaired[k][i][real].tolist() for k in ("input_ids", "attention_mask", "labels")}
                )
            else:
                rows.append(dataset[j])
                paired += 1
        self.record(repnoise_paired_rows=torch.tensor(paired / len(rows)))
        return self._prepare_inputs(self.data_collator(rows))

    def _harmful_by_prompt(self) -> dict[tuple[int, ...], int]:
        if getattr(self, "_by_prompt", None) is None:
            index: dict[tuple[int, ...], int] = {}
            for j, row in enumerate(self.aux_datasets["harmful"]):
                index.setdefault(prompt_key(row["input_ids"], row["attention_mask"], row["labels"]), j)
            self._by_prompt = index
        return self._by_prompt

    @staticmethod
    @torch.no_grad()
    def _batch_retain_loss(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """This micro-batch's mean response CE, for the log (the trained term may be normalised over the window)."""
        labels = inputs["labels"][:, 1:]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


@register_method
class RepNoise(Method):
    """Representation noising in the alignment stage (Rosati et al., 2024; docs/methods.md, RepNoise).

    Keeps the refusal (harmless) loss low while pushing the MLP outputs of harmful text toward Gaussian noise
    (MMD, weight β) and raising the harmful CE read out from every layer (−α·log(1 + CE)). The harmful batch is
    a random, unpaired batch of the alignment prompts' harmful answers, as in the Booster repo's baseline
    (``harmful_pairing: paired`` pairs each refusal with the harmful answer to its question, as Rosati et al.'s
    code does).
    """

    name = "repnoise"
    # An alignment pass, a harmful pass and a readout of every hidden state through the LM head. Bench 2.69×
    # on tiny (9.98× on SmolLM2, whose 49k vocabulary makes the readouts dominate; Llama-2's 32k at d 4096 less so).
    pass_factor = 3.0
    stages = ("align",)
    paper = (
        "Rosati et al., Representation Noising: A Defence Mechanism Against Harmful Finetuning, NeurIPS 2024"
    )
    summary = (
        "alignment: SFT on refusals + β·MMD(harmful MLP outputs, noise) − α·log(1 + layer-wise harmful CE)"
    )
    config_class, trainer_class = RepNoiseConfig, RepNoiseTrainer
    required_roles = ("alignment_harmful",)
    unsupported_modes: ClassVar[dict[str, str]] = {
        mode: "it reads every layer's hidden state through the final norm and the LM head outside the model's "
        f"forward, where {label} does not promise those weights gathered"
        for mode, label in (("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3"))
    }

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        if not ctx.plan.alignment_harmful:
            raise FtguardError(
                "repnoise needs harmful answers for the alignment prompts (the data plan's alignment_harmful set), "
                "and it is empty: point data.alignment and data.finetune.harmful at the same paired file "
                "(e.g. beavertails_refusals, response: safe and unsafe) so that it is built"
            )
        return {"harmful": ctx.tokenize(ctx.plan.alignment_harmful)}
