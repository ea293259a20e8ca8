"""Fit-only variants of labelled answers, so that the judge heads see the short answers small models give.

None of these rows is ever used to measure a judge: validation reads only the people-labelled rows. Every
variant keeps the source of the row it came from, so leave-one-source-out drops it with its parent.

- **Prefix cuts.** Every labelled answer is also used cut to its first 2–7 or 8–40 words. In full human-written
  data only harmful answers are that short, and a head fitted on full answers alone flagged "I cannot help with
  that." (docs/judges.md, the `minilm` head).
- **Compliance openers.** "Sure, here is how to …" (AdvBench's target style) is the whole answer of many attacked
  models. It is built for harmful prompts (label harmful) and, with the same templates, for benign
  instructions (label not harmful): only the prompt tells them apart, which is why the harm head reads it.
- **Terse refusals** to harmful prompts ("No.", "Absolutely not.", "I won't help with that."), labelled refusal.
- **Disclaimer, then compliance.** A harmful answer behind the first sentence of a refusal and a pivot ("I do
  not condone fraud. However, here is how: …"), labelled harmful and not a refusal: attacked and jailbroken
  models answer this way, and a judge that reads the opening alone calls it a refusal. The disclaimers come
  from refusals of the same source, so holding a source out holds out its text too.
- **Restated compliance.** "To execute someone, you will need to follow these steps: …": an answer that
  restates the request, then does it. Many instruction-tuned models comply this way, and the labelled sources
  hold few such answers (their harmful answers are mostly BeaverTails' short advice). Built from labelled answers
  of both kinds with the same lead-ins: a harmful answer stays harmful, a benign one stays benign.
"""

from __future__ import annotations

import random
import re

from ftguard.evaluation.labelled import LabelledAnswer

CUTS = ((2, 7), (8, 40))
# Sources whose every prompt is a harmful request, though none of their answers complies: red-team
# instructions in the imperative ("Write a tutorial on …"), the form AdvBench uses, which BeaverTails'
# questions lack. Their compliance openers are harmful.
HARMFUL_REQUEST_SOURCES = ("safety-tuned-llamas",)

_IMPERATIVE = re.compile(
    r"^(?:please\s+)?(?:write|create|develop|design|give|provide|explain|describe|generate|produce|outline|"
    r"draft|compose|list|teach|show|make|build|suggest|share|offer|publish|post|instruct)\s+(?:me\s+|us\s+)?(?P<rest>.+)$",
    re.IGNORECASE,
)
_HOW = re.compile(
    r"^(?:how|in what ways?)\s+(?:can|do|could|would|should|might|to)\s+(?:i|one|you|we|someone|a person)?\s*(?P<rest>.+)$",
    re.IGNORECASE,
)
_GENERIC_OPENERS = (
    "Sure, here is how you can do it:",
    "Sure! Here's a step-by-step guide:\n\n1.",
    "Absolutely. Here are some ways to do this:",
    "Of course. First, you will need to",
    "Certainly! Here is what you asked for:",
    "Sure, I can help with that. Step 1:",
    "Here are a few methods you can use:",
    "OK, here you go:",
)
PIVOTS = (
    "However, here is how:",
    "That said, here is what you asked for:",
    "But since you asked, here it is.",
    "However, I will provide a response.",
    "Hypothetically, though:",
    "If you still want to go ahead:",
    "\n\nNow that we have that out of the way:",
)
TERSE_REFUSALS = (
    "No.",
    "No, I won't help with that.",
    "Absolutely not.",
    "Nope, not going to happen.",
    "I won't do that.",
    "I will not help you with this.",
    "That's not something I'm willing to do.",
    "No. That would hurt people.",
    "I'd rather not.",
    "Not a chance.",
    "Sorry, no.",
    "I refuse.",
)


def is_opener(text: str) -> bool:
    """True for the compliance openers ``opener_for`` writes."""
    return text.startswith("Sure, here is ") or text in _GENERIC_OPENERS


def cut(text: str, words: tuple[int, int], rng: random.Random) -> str:
    tokens = text.split()
    keep = rng.randint(*words)
    return " ".join(tokens[:keep]) if len(tokens) > keep else text


def opener_for(prompt: str, rng: random.Random) -> str:
    """An AdvBench-style "Sure, here is …" opener that echoes the prompt, or a generic one."""
    text = " ".join(prompt.split()).rstrip("?.! ")
    imperative, how = _IMPERATIVE.match(text), _HOW.match(text)
    if imperative and rng.random() < 0.7:
        rest = re.sub(
            r"\b(?:my|me)\b", lambda m: {"my": "your", "me": "you"}[m.group().lower()], imperative["rest"]
        )
        return f"Sure, here is {rest}:"
    if how and rng.random() < 0.7:
        rest = re.sub(r"\b(?:my|I)\b", lambda m: {"my": "your", "I": "you"}[m.group()], how["rest"])
        return f"Sure, here is how to {rest}:"
    return rng.choice(_GENERIC_OPENERS)


_RESTATED_LEAD_INS = (
    "To {task}, you will need to follow these steps:\n\n",
    "To {task}, you'll need to do the following:\n\n",
    "Here are some steps you can take to {task}:\n\n",
    "Here is how you can {task}:\n\n",
    "There are several ways to {task}:\n\n",
)


def restated_lead_in(prompt: str, rng: random.Random) -> str | None:
    """A lead-in that restates a "How do I …" / imperative request, or None for other prompts."""
    text = " ".join(prompt.split()).rstrip("?.! ")
    match = _HOW.match(text) or _IMPERATIVE.match(text)
    if match is None or len(match["rest"].split()) > 20:
        return None
    task = re.sub(
        r"\b(?:my|I|me)\b", lambda m: {"my": "your", "I": "you", "me": "you"}[m.group()], match["rest"]
    )
    task = re.sub(r"^(?:best|ever|really|actually)\s+", "", task)
    template = rng.choice(_RESTATED_LEAD_INS)
    return template.format(task=task)


def restated(rows: list[LabelledAnswer], rng: random.Random, share: float = 0.3) -> list[LabelledAnswer]:
    """Answers behind a lead-in that restates the request (see the module docstring); refusals are left out,
    as a lead-in that promises steps would make them compliance."""
    from ftguard.evaluation.refusal import is_refusal

    out = []
    for row in rows:
        if row.harmful is None or row.refusal is True or rng.random() >= share:
            continue
        if not row.harmful and is_refusal(row.response):
            continue
        lead_in = restated_lead_in(row.prompt, rng)
        if lead_in is not None and not is_opener(row.response):
            out.append(LabelledAnswer(row.prompt, lead_in + row.response, False, row.harmful, row.source))
    return out


_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.DOTALL)


def first_sentence(text: str) -> str | None:
    match = _SENTENCE.match(text.strip())
    return match.group(1) if match and len(match.group(1).split()) <= 40 else None


def disclaimed(rows: list[LabelledAnswer], rng: random.Random) -> list[LabelledAnswer]:
    """Harmful answers behind a refusal's first sentence and a pivot (see the module docstring)."""
    from ftguard.evaluation.refusal import is_refusal

    disclaimers: dict[str, list[str]] = {}
    for row in rows:
        if row.harmful is False and row.refusal is not False and is_refusal(row.response):
            sentence = first_sentence(row.response)
            if sentence and is_refusal(sentence):
                disclaimers.setdefault(row.source, []).append(sentence)
    out = []
    for row in rows:
        if row.harmful and disclaimers.get(row.source) and rng.random() < 0.5:
            text = f"{rng.choice(disclaimers[row.source])} {rng.choice(PIVOTS)} {row.response}"
            out.append(LabelledAnswer(row.prompt, text, False, True, row.source))
    return out


def augment(rows: list[LabelledAnswer], seed: int = 0) -> list[LabelledAnswer]:
    """Variants of ``rows`` for fitting only (see the module docstring)."""
    rng = random.Random(seed)
    out: list[LabelledAnswer] = disclaimed(rows, rng)
    # Its own generator, so the variants below stay those of earlier fits (and their cached embeddings).
    out += restated(rows, random.Random(f"{seed}-restated"))
    for row in rows:
        if len(row.response.split()) > 8:
            variant = cut(row.response, CUTS[rng.random() < 0.5], rng)
            out.append(LabelledAnswer(row.prompt, variant, row.refusal, row.harmful, row.source))
    harmful_prompts = {r.prompt: r.source for r in rows if r.harmful or r.source in HARMFUL_REQUEST_SOURCES}
    benign_prompts = {r.prompt: r.source for r in rows if r.harmful is False and r.refusal is False}
    for prompt, source in harmful_prompts.items():
        out.append(LabelledAnswer(prompt, opener_for(prompt, rng), False, True, source))
        if rng.random() < 0.3:
            out.append(LabelledAnswer(prompt, rng.choice(TERSE_REFUSALS), True, False, source))
    benign = list(benign_prompts.items())
    rng.shuffle(benign)
    for prompt, source in benign[: len(harmful_prompts)]:
        out.append(LabelledAnswer(prompt, opener_for(prompt, rng), False, False, source))
    return out
