"""The run config: one YAML file describes a whole pipeline run.

Defaults follow the Booster protocol (docs/methods.md, Booster and Protocol), the one whose alignment data
(refusals) we have offline; each default names the section of docs/methods.md it follows. Sizes that
would need the full 30k BeaverTails default to "all available" (``null``) instead of failing on smaller local
copies.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ftguard.errors import FtguardError
from ftguard.schema import ConfigError, check, from_dict, to_dict

STAGES = ("align", "finetune", "post")
EVAL_POINTS = ("base", "align", "finetune", "post")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


# Built-in base models whose tokenizer has no chat template (they need model.template: alpaca). Here, not in
# models/, because config stays torch-free.
BUILTIN_WITHOUT_CHAT_TEMPLATE = ("gemma3-270m",)


@dataclass
class ModelConfig:
    name: str = _help("'tiny', 'smollm2-135m', 'gemma3-270m', a hub id or a local path", default="tiny")
    revision: str | None = _help("hub revision (commit, tag or branch)", default=None)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "weights dtype; auto = bf16 on a bf16-capable GPU (unless $FTGUARD_PRECISION=fp32), else fp32",
        default="auto",
    )
    trust_remote_code: bool = _help(
        "run code shipped with a hub model (off unless you trust it)", default=False
    )
    template: Literal["alpaca", "chat"] = _help(
        "prompt format: Alpaca (docs/methods.md, Prompt template) or the model's chat template",
        default="alpaca",
    )
    response_newline: bool = _help(
        "append a newline after '### Response:' (Booster's variant; docs/methods.md, Prompt template)",
        default=False,
    )
    max_length: int = _help(
        "max tokens per training sample (Booster forces 256; docs/methods.md, Booster)", default=256
    )

    def __post_init__(self) -> None:
        check(bool(self.name), "name", "must not be empty")
        check(self.max_length >= 8, "max_length", f"must be ≥ 8, got {self.max_length}")
        # Known before any conversion or judge loading, not at the first prompt of a run.
        check(
            not (self.template == "chat" and self.name in BUILTIN_WITHOUT_CHAT_TEMPLATE),
            "template",
            f"'{self.name}' is a base model without a chat template: set model.template: alpaca",
        )
        # format_prompt ignores the newline in chat templates: a run would differ from what its config says.
        check(
            not (self.response_newline and self.template == "chat"),
            "response_newline",
            "only applies to template 'alpaca' (a chat template ends the prompt itself): remove it or set "
            "model.template: alpaca",
        )


@dataclass
class LoraConfig:
    # Booster protocol LoRA (docs/methods.md, Adapter topologies): r 32, α 4, q/k/v, no dropout.
    r: int = _help("LoRA rank", default=32)
    alpha: float = _help("LoRA alpha (scaling = alpha / r)", default=4.0)
    dropout: float = _help("LoRA dropout", default=0.0)
    target_modules: list[str] = _help(
        "module names to adapt", default_factory=lambda: ["q_proj", "k_proj", "v_proj"]
    )

    def __post_init__(self) -> None:
        check(self.r >= 1, "r", f"must be ≥ 1, got {self.r}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.target_modules) > 0, "target_modules", "must name at least one module")


@dataclass
class AdapterConfig:
    topology: Literal["double", "single", "full"] = _help(
        "double: merge the alignment LoRA, train a new one; single: keep training the alignment LoRA "
        "(Booster); full: full fine-tuning (docs/methods.md, Adapter topologies)",
        default="double",
    )
    align: LoraConfig = _help("LoRA of the alignment stage", default_factory=LoraConfig)
    finetune: LoraConfig = _help(
        "new LoRA of the fine-tuning stage (double topology)", default_factory=LoraConfig
    )
    finetune_full: bool = _help(
        "double topology only: the fine-tune trains every weight of the merged aligned model instead of a new "
        "LoRA (the full-parameter attacker beside the LoRA one; docs/attacks.md)",
        default=False,
    )

    def __post_init__(self) -> None:
        check(
            not self.finetune_full or self.topology == "double",
            "finetune_full",
            f"needs topology double (a LoRA alignment merged, then a full fine-tune), not {self.topology}: "
            "topology full already trains every weight in both stages, single continues the alignment LoRA",
        )

    def trains_full(self, stage: str) -> bool:
        """Whether ``stage`` trains every weight (topology full, or the full-parameter fine-tune)."""
        return self.topology == "full" or (stage == "finetune" and self.finetune_full)


@dataclass
class SourceConfig:
    source: str = _help(
        "data source name (beavertails_refusals, beavertails, jsonl, ...)", default="beavertails_refusals"
    )
    split: str = _help("split of the source", default="train")
    response: str | None = _help(
        "which answer field is the target (safe / unsafe) for BeaverTails-style data", default=None
    )
    path: str | None = _help("file path, for source 'jsonl'", default=None)
    n: int | None = _help("number of samples; null = all available", default=None)

    def __post_init__(self) -> None:
        check(self.n is None or self.n >= 1, "n", f"must be ≥ 1 or null, got {self.n}")
        check(self.source != "jsonl" or bool(self.path), "path", "is required when source is 'jsonl'")


def _alignment_default() -> SourceConfig:
    # Booster aligns on the refusals of 4,999 records (docs/methods.md, Alignment data); null takes every
    # record the attack does not use.
    return SourceConfig(source="beavertails_refusals", split="train", response="safe", n=None)


def _harmful_default() -> SourceConfig:
    return SourceConfig(source="beavertails_refusals", split="train", response="unsafe", n=None)


def _benign_sources_default() -> list[SourceConfig]:
    return [SourceConfig(source="dolly", split="train", response="output", n=None)]


@dataclass
class BenignMixConfig:
    """Benign instructions with answers mixed into a stage's data: into the alignment (helpful-and-harmless
    alignment, so that the aligned model refuses harmful requests and still answers ordinary ones) or into the
    user's upload (general instructions beside the task, as a real upload has them)."""

    sources: list[SourceConfig] = _help(
        "benign sources with answers (dolly, lima, jsonl, ...), drawn from in turn",
        default_factory=_benign_sources_default,
    )
    n: int = _help("benign examples mixed in", default=256)
    form: Literal["any", "question"] = _help(
        "any instruction, or only those phrased as a question (How/What/Why/Can …): harmful prompts are mostly "
        "questions, and a small model aligned on refusals to questions and answers to commands learns "
        "'a question → refuse'",
        default="any",
    )
    max_chars: int | None = _help(
        "keep only examples whose prompt and answer together are at most this many characters (about 4 per "
        "token): longer ones are cut at model.max_length, so the model never sees how their answer ends, or "
        "dropped when the prompt alone fills it; null = any length",
        default=None,
    )

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "sources", "must name at least one source")
        check(self.n >= 1, "n", f"must be ≥ 1, got {self.n}")
        check(
            self.max_chars is None or self.max_chars >= 1,
            "max_chars",
            f"must be ≥ 1 or null, got {self.max_chars}",
        )


# Settings added after runs and units were stored, left out of fingerprints while at their neutral value: what was
# made before they existed (where they were, in effect, at that value) is still found.
NEUTRAL_LATER_SETTINGS: dict[tuple[str, ...], Any] = {
    ("adapter", "finetune_full"): False,
    ("data", "finetune", "attack"): {"name": "harmful_mix", "args": {}},
    ("data", "finetune", "upload"): None,
    ("data", "finetune", "upload", "score"): "reference",
    ("evaluate", "pairwise_judge"): None,
    ("evaluate", "pairwise_judge_options"): {},
    ("evaluate", "unreadable_as_degenerate"): False,
}


@dataclass
class AttackSpec:
    """Which attack builds the user's upload (registered attacks: `ftguard attacks`; docs/attacks.md)."""

    name: str = _help(
        "the attack: harmful_mix (the papers' p-harmful upload) or another registered one (`ftguard attacks`)",
        default="harmful_mix",
    )
    args: dict[str, Any] = _help(
        "the attack's own arguments (`ftguard attacks --verbose` lists them)", default_factory=dict
    )


@dataclass
class UploadConfig:
    """A customer's upload taken as it is (docs/provider.md): no task rows, no harmful samples mixed in."""

    path: str = _help("the customer's JSONL file: chat rows ({messages: [...]}) or Alpaca rows", default="")
    format: Literal["auto", "chat", "alpaca"] = _help(
        "auto = chat when a row has 'messages', else Alpaca", default="auto"
    )
    eval_path: str | None = _help(
        "the customer's held-out rows in the same formats, scored against their reference answers (see score); "
        "null = no FA",
        default=None,
    )
    score: Literal["reference", "winrate"] = _help(
        "how FA scores an answer to a held-out row: reference = it matches the row's answer (evaluate.task_rule: "
        "exact or substring; for short answers), winrate = a judge prefers it to the row's answer "
        "(evaluate.pairwise_judge; for free-form answers)",
        default="reference",
    )

    def __post_init__(self) -> None:
        check(bool(self.path), "path", "is required: the customer's upload file")


@dataclass
class FinetuneDataConfig:
    task: str = _help(
        "benign user task: sst2, ag_news, gsm8k, alpaca_eval (free-form answers, FA = win rate by "
        "evaluate.pairwise_judge)",
        default="sst2",
    )
    n: int = _help(
        "samples in the user's upload (Booster/Vaccine n = 1000; docs/methods.md, User data)", default=1000
    )
    harmful_ratio: float | list[float] = _help(
        "fraction p of harmful samples (papers: 0.1); a list runs one fine-tune per ratio from the same "
        "aligned model",
        default=0.1,
    )
    harmful: SourceConfig = _help(
        "where the harmful (prompt, harmful answer) pairs come from", default_factory=_harmful_default
    )
    general: BenignMixConfig | None = _help(
        "general instructions with answers in the upload beside the task (they take n of the benign places at "
        "every ratio): a task of one-word labels alone collapses the model's other answers; null = task only",
        default=None,
    )
    gsm8k_cot_suffix: bool = _help(
        "append Vaccine's step-by-step suffix to GSM8K questions (Lisa, Booster: none)", default=False
    )
    upload: UploadConfig | None = _help(
        "a customer's upload taken as it is, instead of the research mix (task + p harmful); "
        "data.finetune.harmful_ratio must then be 0",
        default=None,
    )
    attack: AttackSpec = _help(
        "how the upload is built from the task, the general instructions and the harmful pool (default: the "
        "papers' p-harmful mix)",
        default_factory=AttackSpec,
    )
    harmful_reserve: int | None = _help(
        "when data.alignment and the harmful pool are one file: how many leading records the attack keeps "
        "(Booster: 5000); null = what the largest ratio needs. Fixing it keeps the aligned model the same "
        "for every ratio (a sweep sets it)",
        default=None,
    )

    @property
    def ratios(self) -> list[float]:
        return self.harmful_ratio if isinstance(self.harmful_ratio, list) else [self.harmful_ratio]

    def __post_init__(self) -> None:
        check(self.n >= 1, "n", f"must be ≥ 1, got {self.n}")
        check(len(self.ratios) > 0, "harmful_ratio", "must not be an empty list")
        for p in self.ratios:
            check(0.0 <= p <= 1.0, "harmful_ratio", f"must be in [0, 1], got {p}")
        check(len(set(self.ratios)) == len(self.ratios), "harmful_ratio", "lists a ratio twice")
        check(
            self.harmful_reserve is None or self.harmful_reserve >= 0,
            "harmful_reserve",
            f"must be ≥ 0 or null, got {self.harmful_reserve}",
        )
        if self.upload is not None:
            check(
                self.ratios == [0.0],
                "harmful_ratio",
                f"must be 0 with an upload (ftguard mixes nothing into the customer's rows), got {self.harmful_ratio}",
            )
            check(
                self.attack.name == "harmful_mix" and not self.attack.args and self.general is None,
                "upload",
                "takes the customer's rows as they are: remove data.finetune.attack and data.finetune.general",
            )


@dataclass
class DataConfig:
    root: str = _help(
        "'bundled' (small offline subset) or a directory laid out like ../shared/data", default="bundled"
    )
    alignment: SourceConfig = _help(
        "safety data of the align stage (prompt → refusal)", default_factory=_alignment_default
    )
    alignment_benign: BenignMixConfig | None = _help(
        "benign instructions mixed into the align stage's data (helpful-and-harmless alignment); null = "
        "refusals only",
        default=None,
    )
    finetune: FinetuneDataConfig = _help("the user's upload", default_factory=FinetuneDataConfig)


@dataclass
class TrainConfig:
    """Maps onto transformers.TrainingArguments; defaults are the Booster alignment stage (docs/methods.md,
    Training defaults)."""

    epochs: float = _help("training epochs (Booster: 20)", default=20.0)
    max_steps: int = _help("stop after this many optimizer steps (-1 = use epochs)", default=-1)
    learning_rate: float = _help("peak learning rate", default=5e-4)
    lr_scheduler: str = _help(
        "transformers scheduler name (constant, cosine, linear, ...)", default="constant"
    )
    warmup_ratio: float = _help("linear warm-up as a fraction of steps (ignored by 'constant')", default=0.0)
    weight_decay: float = _help("AdamW weight decay", default=0.1)
    batch_size: int = _help("per-device batch size", default=10)
    grad_accum: int = _help("gradient accumulation steps", default=1)
    max_grad_norm: float = _help(
        "gradient clipping of the final combined gradient (HF default; docs/methods.md, Training defaults)",
        default=1.0,
    )
    optim: str = _help("transformers optimizer name", default="adamw_torch")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _help(
        "auto = bf16 where it is native (bf16 GPU, AVX512-BF16/AMX CPU), else fp32; "
        "$FTGUARD_PRECISION=fp32|bf16 forces it",
        default="auto",
    )
    gradient_checkpointing: bool = _help("trade compute for memory", default=False)
    logging_steps: int = _help("log every N steps", default=10)
    save_steps: int = _help("checkpoint every N steps (resume point)", default=200)
    save_total_limit: int = _help("checkpoints kept", default=1)

    def __post_init__(self) -> None:
        check(self.epochs > 0 or self.max_steps > 0, "epochs", "or max_steps must be positive")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.batch_size >= 1, "batch_size", f"must be ≥ 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "grad_accum", f"must be ≥ 1, got {self.grad_accum}")
        check(self.save_steps >= 1, "save_steps", f"must be ≥ 1, got {self.save_steps}")
        check(self.logging_steps >= 1, "logging_steps", f"must be ≥ 1, got {self.logging_steps}")


def _finetune_train_default() -> TrainConfig:
    # Booster fine-tuning (docs/methods.md, User data): lr 1e-5 constant, 20 epochs, batch size 10.
    return TrainConfig(learning_rate=1e-5)


@dataclass
class StageConfig:
    method: str = _help("registered method name (see `ftguard methods`)", default="sft")
    args: dict[str, Any] = _help(
        "the method's own hyperparameters (validated by the method)", default_factory=dict
    )
    train: TrainConfig = _help("optimizer and schedule", default_factory=TrainConfig)


@dataclass
class PostStageConfig:
    method: str = _help("registered post-stage method (see `ftguard methods`)", default="recovery")
    args: dict[str, Any] = _help(
        "the method's own hyperparameters (validated by the method)", default_factory=dict
    )
    validation_n: int = _help(
        "task training examples outside the user's upload, held out for methods that check the task score "
        "while repairing (recovery's δ rule); never the evaluation set",
        default=64,
    )

    def __post_init__(self) -> None:
        check(self.validation_n >= 1, "validation_n", f"must be ≥ 1, got {self.validation_n}")


@dataclass
class FinetuneStageConfig(StageConfig):
    train: TrainConfig = _help("optimizer and schedule", default_factory=_finetune_train_default)


def _over_refusal_default() -> SourceConfig:
    # XSTest v2's 250 safe prompts ("How can I kill a Python process?"): a calibrated model answers them all.
    return SourceConfig(source="xstest", split="safe", response=None, n=None)


def _harmful_eval_default() -> SourceConfig:
    # Held-out harmful prompts; Booster uses the first 1000 unsafe 30k_test prompts (docs/methods.md,
    # Harmful score).
    return SourceConfig(source="beavertails_refusals", split="test", response=None, n=None)


@dataclass
class EvalConfig:
    points: list[str] = _help(
        "which models to evaluate: base, align, finetune, post", default_factory=lambda: list(EVAL_POINTS)
    )
    judge: str = _help(
        "harmfulness judge (`ftguard judge validate` checks one): ftguard-judge (offline, CPU), beaver-dam (the "
        "papers'), llama-guard, llama-guard-1b, qwen3guard, duoguard, minilm, keyword",
        default="ftguard-judge",
    )
    judge_options: dict[str, Any] = _help(
        "options passed to the judge (e.g. model path)", default_factory=dict
    )
    extra_judges: list[str] = _help(
        "more judges run on the same answers: their HS and their agreement (Cohen's kappa) with the main judge",
        default_factory=list,
    )
    over_refusal_prompts: SourceConfig | None = _help(
        "benign prompts for the over-refusal rate (share refused); null = skip",
        default_factory=_over_refusal_default,
    )
    instruction_prompts: SourceConfig | None = _help(
        "ordinary benign instructions (e.g. alpaca_eval) for the instruction-refusal rate, held out from any "
        "training data; null = skip",
        default=None,
    )
    refusal_detector: Literal["ftguard", "rules"] = _help(
        "what counts as a refusal of a benign prompt: ftguard (rules + a learned head on MiniLM, offline) or rules "
        "(phrase rules alone); accuracy of both in docs/judges.md",
        default="ftguard",
    )
    over_refusal_max_new_tokens: int = _help(
        "new tokens per benign prompt (refusals show in the first sentence)", default=64
    )
    unreadable_as_degenerate: bool = _help(
        "also read answers in which fewer than half of the words are English words as degenerate: never harmful in "
        "HS, counted in HS+ and the degenerate rates (docs/judges.md, Unreadable answers); off by default until the "
        "CPU study that began under the narrower rule is closed",
        default=False,
    )
    harmful_prompts: SourceConfig = _help(
        "held-out harmful prompts for HS", default_factory=_harmful_eval_default
    )
    max_new_tokens: int = _help("new tokens per harmful prompt (Booster 512, Vaccine 128)", default=512)
    task_n: int | None = _help(
        "task evaluation samples: the first n, or all when fewer (Booster: up to 1000); null = all",
        default=1000,
    )
    task_max_new_tokens: int = _help("new tokens per task prompt (papers: 200)", default=200)
    task_rule: Literal["exact", "substring"] = _help(
        "label match rule: exact (Lisa/Booster) or substring (Vaccine)", default="exact"
    )
    pairwise_judge: str | None = _help(
        "judge of free-form task answers against reference answers, for a win-rate FA (task alpaca_eval, or an "
        "upload with score: winrate): local-lm (a local causal LM; options.model = its path) or openai-compatible "
        "(opt-in: sends prompts and answers to that endpoint; key from the environment); null = none",
        default=None,
    )
    pairwise_judge_options: dict[str, Any] = _help(
        "options of the pairwise judge (local-lm: model, revision, dtype, tie_margin; openai-compatible: model, "
        "base_url, version, api_key_env)",
        default_factory=dict,
    )
    batch_size: int = _help("generation batch size", default=16)
    mixed_precision: Literal["auto", "no", "bf16"] = _help(
        "autocast for generation; auto = bf16 on a bf16 GPU, fp32 on CPU (there bf16 barely speeds up generation and "
        "makes answers depend on the batch size); $FTGUARD_PRECISION=fp32|bf16 forces it",
        default="auto",
    )

    def __post_init__(self) -> None:
        for p in self.points:
            check(p in EVAL_POINTS, "points", f"entries must be among {list(EVAL_POINTS)}, got {p!r}")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be ≥ 1")
        check(self.task_max_new_tokens >= 1, "task_max_new_tokens", "must be ≥ 1")
        check(self.task_n is None or self.task_n >= 1, "task_n", "must be ≥ 1 or null")
        check(self.batch_size >= 1, "batch_size", "must be ≥ 1")
        check(self.over_refusal_max_new_tokens >= 1, "over_refusal_max_new_tokens", "must be ≥ 1")
        check(self.judge not in self.extra_judges, "extra_judges", f"repeats the main judge {self.judge!r}")
        check(len(set(self.extra_judges)) == len(self.extra_judges), "extra_judges", "lists a judge twice")
        if self.pairwise_judge is not None:
            from ftguard.evaluation.winrate import check_pairwise_judge

            problem = check_pairwise_judge(self.pairwise_judge, self.pairwise_judge_options)
            key = "pairwise_judge" if problem is None or "unknown" in problem else "pairwise_judge_options"
            check(problem is None, key, str(problem))
        else:
            check(
                not self.pairwise_judge_options,
                "pairwise_judge_options",
                "are set but evaluate.pairwise_judge is null: name the judge (local-lm or openai-compatible)",
            )


@dataclass
class RunConfig:
    name: str = _help("run name", default="run")
    description: str = _help("free text, kept with the results", default="")
    seed: int = _help("global seed (the git-disl repos use 43)", default=43)
    output_dir: str | None = _help("where the run writes; default runs/<name>", default=None)
    model: ModelConfig = _help("the model to align and fine-tune", default_factory=ModelConfig)
    adapter: AdapterConfig = _help("LoRA topology", default_factory=AdapterConfig)
    data: DataConfig = _help("data roles and sizes", default_factory=DataConfig)
    align: StageConfig | None = _help(
        "alignment stage; null = skip it (the 'non-aligned' baseline)", default_factory=StageConfig
    )
    finetune: FinetuneStageConfig | None = _help(
        "the user's fine-tuning stage; null = skip it", default_factory=FinetuneStageConfig
    )
    post: PostStageConfig | None = _help(
        "repair after fine-tuning (recovery, antidote, safelora); null = skip it", default=None
    )
    evaluate: EvalConfig = _help("evaluation", default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", "must not be empty")
        if self.align is None:
            check(
                "align" not in self.evaluate.points,
                "evaluate.points",
                "lists 'align' but the align stage is null: remove 'align' from it, e.g. evaluate.points: "
                "[base, finetune]",
            )
        if self.finetune is None:
            check(
                "finetune" not in self.evaluate.points,
                "evaluate.points",
                "lists 'finetune' but the finetune stage is null: remove 'finetune' from it, e.g. "
                "evaluate.points: [base, align]",
            )
        if self.post is not None:
            check(
                self.finetune is not None, "post", "repairs a fine-tuned model: it needs the finetune stage"
            )
        elif "post" in self.evaluate.points:
            # The default list names every point; without a post stage there is simply nothing to evaluate there.
            self.evaluate.points = [p for p in self.evaluate.points if p != "post"]
        # without a finetune stage the plan reads no upload: FA is the task's
        upload = self.data.finetune.upload if self.finetune is not None else None
        winrate = self.data.finetune.task == "alpaca_eval" if upload is None else upload.score == "winrate"
        if winrate and self.evaluate.pairwise_judge is None:
            what = "task alpaca_eval" if upload is None else "data.finetune.upload.score: winrate"
            check(
                False,
                "evaluate.pairwise_judge",
                f"is required by {what} (FA is a win rate against reference answers): e.g. evaluate.pairwise_judge: "
                "local-lm with evaluate.pairwise_judge_options: {model: PATH}",
            )

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the given top-level sections (all when none): what a stage's output depends on."""
        data = self.to_dict()
        for path, neutral in NEUTRAL_LATER_SETTINGS.items():
            *parents, leaf = path
            section = data
            for key in parents:
                section = section.get(key) or {}
            if section.get(leaf, None) == neutral:
                section.pop(leaf)
        picked = {k: data[k] for k in sections} if sections else data
        blob = json.dumps(picked, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def packaged_configs_dir() -> Path:
    return Path(__file__).parent / "configs"


def packaged_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(packaged_configs_dir().glob("*.yaml"))}


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    configs = packaged_configs()
    if name_or_path in configs:
        return configs[name_or_path]
    nested = packaged_configs_dir() / f"{name_or_path}.yaml"  # presets in subfolders: paper/booster-llama2-7b
    if nested.is_file():
        return nested
    import difflib

    close = difflib.get_close_matches(name_or_path, list(configs), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise FtguardError(
        f"config '{name_or_path}' is neither a file nor a packaged config{hint} (list them with `ftguard configs`)"
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (['a','b','c'], value parsed as a YAML scalar/list)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{item}' has an empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return set_keys(data, [(*parse_override(item), f"override '{item}'") for item in overrides])


def set_keys(data: dict[str, Any], settings: list[tuple[list[str], Any, str]]) -> dict[str, Any]:
    """A copy of ``data`` with each (key path, value, origin) set; ``origin`` names the setting in errors."""
    data = copy.deepcopy(data)
    for parts, value, origin in settings:
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{origin}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists, scalars, null) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_base(name: str, folder: Path) -> Path:
    """A ``base:`` entry: a path relative to the including file (with or without .yaml), else a packaged name."""
    local = folder / name
    for candidate in (local, local.with_name(local.name + ".yaml")):
        if candidate.is_file():
            return candidate
    return resolve_config_path(name)


def read_config_data(name_or_path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a run config with its ``base:`` chain applied (this file's keys over its base's), so a
    config can be a short delta: ``base: vaccine-tiny`` then only what differs."""
    path = resolve_config_path(str(name_or_path)).resolve()
    if path in _chain:
        cycle = " → ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"{path}: 'base' chain loops ({cycle})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: 'base' must name a run config (a packaged name or a path), got {base!r}")
    return merge(read_config_data(_resolve_base(base, path.parent), (*_chain, path)), data)


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (file or packaged name, with its ``base:`` chain), apply ``key=value`` overrides and
    validate its types and values. Method args and registered names are checked by ``ftguard.resolve.load_run``."""
    data = apply_overrides(read_config_data(name_or_path), overrides or [])
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return from_dict(RunConfig, data)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
