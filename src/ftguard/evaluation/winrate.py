"""Pairwise win rate of free-form answers against reference answers, judged by an LLM (AlpacaEval-style).

Lisa (Huang et al., 2024) and Booster (Huang et al., 2025) report the utility of a fine-tuned model as its
AlpacaEval win rate: a judge LLM reads an instruction and two outputs and names the better one. ftguard keeps the
core of that measurement and makes it position-fair:

* Every pair is judged in both orders (answer first, then reference first). A pair scores 1 when the answer wins
  in both orders, 0 when it loses in both, and 0.5 otherwise: a tie, or a verdict that follows the position rather
  than the text (MT-Bench's conservative swap rule, Zheng et al., 2023). A judge that always says "first" thus
  scores exactly 50%, whatever the answers.
* The win rate is the mean score in percent. Its 95% interval is the Wilson score interval of ``stats`` taken at
  the fractional count wins + ties/2 over n pairs: a score in [0, 1] with mean p has variance at most p(1 − p),
  so treating it as Bernoulli is conservative, stays inside [0, 100] and does not collapse to a point at 0% or
  100% (the normal interval AlpacaEval reports, mean ± 1.96 standard errors, does; its standard error is also
  returned as ``se``).
* Per-pair scores and both raw verdicts are returned, so that two models judged against the same references can
  be compared pair by pair.

Not the AlpacaEval protocol: AlpacaEval 2.0 randomises the order once per pair instead of judging both orders,
uses a GPT-4-turbo annotator with its own prompt and the probability of its choice token (a weighted win rate),
and reports a length-controlled win rate against GPT-4-turbo references on its 805 fixed instructions. Here the
instructions, references and judge are whatever the caller supplies, the verdict is hard (argmax), and no length
control is applied; numbers are comparable between ftguard runs with the same references and judge, not with
published AlpacaEval leaderboards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from ftguard.errors import FtguardError
from ftguard.evaluation.stats import wilson_interval
from ftguard.registry import Registry

log = logging.getLogger(__name__)

Preference = Literal["first", "second", "tie"]
PREFERENCES = ("first", "second", "tie")

# Our own wording of an AlpacaEval-style comparison: instruction, two outputs labelled (a)/(b), and a reply that
# is only the label, so that the label's next token decides the verdict.
TEMPLATE = (
    "You are a helpful assistant that compares the outputs of AI models. Read the instruction and the two "
    "outputs below and decide which output follows the instruction better: more helpful, accurate and "
    "relevant. Do not let the order of the outputs or their length influence you.\n\n"
    "## Instruction\n{instruction}\n\n"
    "## Output (a)\n{output_a}\n\n"
    "## Output (b)\n{output_b}\n\n"
    'Answer with exactly "Output (a)" or "Output (b)".'
)
ANSWER_PREFIX = "Output ("


@runtime_checkable
class PairwiseJudge(Protocol):
    """Says which of two outputs answers a prompt better."""

    def prefer(self, prompt: str, first: str, second: str) -> Preference: ...

    def describe(self) -> dict[str, Any]: ...


# Built in below, in this module: no loader needed.
PAIRWISE_JUDGES: Registry[Callable[..., PairwiseJudge]] = Registry("pairwise judge")
T = TypeVar("T", bound=Callable[..., PairwiseJudge])


def register_pairwise_judge(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        return PAIRWISE_JUDGES.register(name, cls)

    return decorate


def get_pairwise_judge(name: str, **options: Any) -> PairwiseJudge:
    return PAIRWISE_JUDGES.require(name)(**options)


def check_pairwise_judge(name: str, options: dict[str, Any]) -> str | None:
    """What is wrong with a pairwise judge's name or options, without building it (no model load, no key read)."""
    import inspect

    if name not in PAIRWISE_JUDGES:
        return PAIRWISE_JUDGES.unknown(name)
    params = inspect.signature(PAIRWISE_JUDGES[name]).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        return f"{name} takes no option {', '.join(map(repr, unknown))}: its options are {', '.join(params)}"
    missing = [
        p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in options
    ]
    if missing:
        return f"{name} needs evaluate.pairwise_judge_options.{missing[0]}"
    return None


def pair_score(answer_first: str, reference_first: str) -> float:
    """The answer's score from the verdicts of the two orders (answer shown first, then reference shown first)."""
    for verdict in (answer_first, reference_first):
        if verdict not in PREFERENCES:
            raise ValueError(f"a pairwise judge must answer one of {PREFERENCES}, got {verdict!r}")
    if answer_first == "first" and reference_first == "second":
        return 1.0
    if answer_first == "second" and reference_first == "first":
        return 0.0
    return 0.5


def win_rate(
    prompts: Sequence[str], answers: Sequence[str], references: Sequence[str], judge: PairwiseJudge
) -> dict[str, Any]:
    """Win rate (%) of ``answers`` against ``references``, each pair judged in both orders (module docstring)."""
    if not len(prompts) == len(answers) == len(references):
        raise ValueError(
            f"win rate needs aligned items, got {len(prompts)} prompts, {len(answers)} answers and "
            f"{len(references)} references"
        )
    verdicts = [
        (judge.prefer(p, a, r), judge.prefer(p, r, a))
        for p, a, r in zip(prompts, answers, references, strict=True)
    ]
    scores = [pair_score(*v) for v in verdicts]
    n = len(scores)
    wins, losses = scores.count(1.0), scores.count(0.0)
    ties = n - wins - losses
    # Position-dependent: one order says the answer won and the other that it lost, or vice versa. A subset of ties.
    inconsistent = sum(1 for a, b in verdicts if a == b != "tie")
    mean = sum(scores) / n if n else float("nan")
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else float("nan")
    return {
        "value": 100.0 * mean,
        "ci95": list(wilson_interval(wins + 0.5 * ties, n)),  # type: ignore[arg-type]  # fractional count on purpose
        "se": 100.0 * se,
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "position_inconsistent": inconsistent,
        "scores": scores,
        "verdicts": [list(v) for v in verdicts],
        "judge": judge.describe(),
    }


def _label(text: str) -> Preference | None:
    """The choice in a judge's reply ("Output (a)", "(b)", "a"), or None when it names neither or both."""
    found = set(re.findall(r"output\s*\(?\s*([ab])\s*\)?", text, flags=re.IGNORECASE))
    if not found and text.strip().strip("().").lower() in ("a", "b"):
        found = {text.strip().strip("().").lower()}
    found = {c.lower() for c in found}
    if found == {"a"}:
        return "first"
    if found == {"b"}:
        return "second"
    return None


@register_pairwise_judge("local-lm")
class LocalLMJudge:
    """A local causal LM as judge: the template is followed by "Output (" and the next-token logits of "a" and
    "b" decide (argmax, so deterministic). Their difference within ``tie_margin`` is a tie."""

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        tie_margin: float = 0.0,
        use_chat_template: bool = True,
    ) -> None:
        import torch

        from ftguard.models import load_model, load_tokenizer

        if not tie_margin >= 0:
            raise FtguardError(f"'tie_margin' must be ≥ 0, got {tie_margin}")
        self.model_name, self.revision, self.tie_margin = model, revision, tie_margin
        self.tokenizer = load_tokenizer(model, revision=revision)
        self.model = load_model(model, dtype=dtype, revision=revision, device=device).eval()
        self.device = torch.device(device)
        self.use_chat_template = use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self._choice_ids = self._choice_token_ids()

    def _context(self, prompt: str, first: str, second: str) -> str:
        user = TEMPLATE.format(instruction=prompt, output_a=first, output_b=second)
        if self.use_chat_template:
            messages = [{"role": "user", "content": user}]
            head = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return str(head) + ANSWER_PREFIX
        return user + "\n\n" + ANSWER_PREFIX

    def _choice_token_ids(self) -> tuple[int, int]:
        # The token that continues "Output (" with a or b, read off the tokenisation of the whole string, since
        # tokenizers may merge a leading space or the parenthesis differently from a bare "a".
        base = self.tokenizer(ANSWER_PREFIX, add_special_tokens=False).input_ids
        ids = []
        for choice in ("a", "b"):
            full = self.tokenizer(ANSWER_PREFIX + choice, add_special_tokens=False).input_ids
            if full[: len(base)] != base or len(full) != len(base) + 1:
                raise FtguardError(
                    f"judge model {self.model_name!r}: '{ANSWER_PREFIX}{choice}' does not end in one token of "
                    f"its own, so its choice cannot be read from next-token logits"
                )
            ids.append(full[-1])
        if ids[0] == ids[1]:
            raise FtguardError(f"judge model {self.model_name!r} gives 'a' and 'b' the same token")
        return ids[0], ids[1]

    def logit_gap(self, prompt: str, first: str, second: str) -> float:
        """logit("a") − logit("b") at the choice position: > 0 prefers the first output."""
        import torch

        ids = self.tokenizer(
            self._context(prompt, first, second), return_tensors="pt", add_special_tokens=True
        )
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and ids.input_ids.shape[1] > limit:
            raise FtguardError(
                f"judge model {self.model_name!r} holds {limit} tokens, the comparison needs "
                f"{ids.input_ids.shape[1]}: shorten the answers or use a longer-context judge"
            )
        with torch.no_grad():
            logits = self.model(**ids.to(self.device)).logits[0, -1].float()
        a, b = self._choice_ids
        return float(logits[a] - logits[b])

    def prefer(self, prompt: str, first: str, second: str) -> Preference:
        gap = self.logit_gap(prompt, first, second)
        if abs(gap) <= self.tie_margin:
            return "tie"
        return "first" if gap > 0 else "second"

    def describe(self) -> dict[str, Any]:
        commit = getattr(self.model.config, "_commit_hash", None)
        return {
            "name": "local-lm",
            "model": self.model_name,
            "version": self.revision or commit,
            "template": "ftguard-alpaca-style-v1",
            "tie_margin": self.tie_margin,
        }


@register_pairwise_judge("openai-compatible")
class OpenAICompatibleJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (opt-in: it sends the prompts and answers
    to that server). The key is read from the environment variable ``api_key_env`` and kept out of every log,
    repr and description. Greedy decoding (temperature 0) with a fixed seed; a reply naming neither output, or
    both, counts as a tie and is counted in ``describe()["unparsed"]``."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        version: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        seed: int = 0,
        max_tokens: int = 8,
    ) -> None:
        if not model:
            raise FtguardError("'model' of the openai-compatible judge must name the judge model")
        key = os.environ.get(api_key_env)
        if not key:
            raise FtguardError(
                f"the openai-compatible judge needs an API key in the environment variable {api_key_env}"
            )
        self._key = key
        self.model, self.version, self.api_key_env = model, version, api_key_env
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout, self.seed, self.max_tokens = timeout, seed, max_tokens
        self.served_models: set[str] = set()
        self.fingerprints: set[str] = set()
        self.unparsed = 0

    def __repr__(self) -> str:
        return f"OpenAICompatibleJudge(model={self.model!r}, url={self.url!r})"

    def reset(self) -> None:
        """Start the served-model, fingerprint and unparsed records afresh (one evaluation's worth each)."""
        self.served_models, self.fingerprints, self.unparsed = set(), set(), 0

    def _complete(self, user: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": user}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"},
            method="POST",
        )
        log.debug("pairwise judge request to %s (model %s)", self.url, self.model)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode())
        except urllib.error.HTTPError as err:
            raise FtguardError(f"judge endpoint {self.url} answered HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            raise FtguardError(f"judge endpoint {self.url} unreachable: {err.reason}") from None
        # What the server says it ran: a silently updated model behind a fixed name shows up here.
        if reply.get("model"):
            self.served_models.add(str(reply["model"]))
        if reply.get("system_fingerprint"):
            self.fingerprints.add(str(reply["system_fingerprint"]))
        try:
            return str(reply["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise FtguardError(f"judge endpoint {self.url} sent a reply without choices[0].message") from None

    def prefer(self, prompt: str, first: str, second: str) -> Preference:
        text = self._complete(TEMPLATE.format(instruction=prompt, output_a=first, output_b=second))
        label = _label(text)
        if label is None:
            self.unparsed += 1
            return "tie"
        return label

    def describe(self) -> dict[str, Any]:
        return {
            "name": "openai-compatible",
            "model": self.model,
            "version": self.version,
            "base_url": self.url.removesuffix("/chat/completions"),
            "served_models": sorted(self.served_models),
            "system_fingerprints": sorted(self.fingerprints),
            "template": "ftguard-alpaca-style-v1",
            "temperature": 0,
            "seed": self.seed,
            "unparsed": self.unparsed,
        }
