"""Public labelled answer sets, read from their published formats into ``LabelledAnswer`` rows.

What each label means, and where a label is derived rather than given by people, is stated per source in
``SOURCES`` and in docs/judges.md. ``data_dir`` is a folder laid out like the offline copies this project
validates on (``xstest/``, ``judge_labelled/``, ``beavertails_refusals/``, ...; docs/judges.md lists the
upstream repositories).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

from ftguard.errors import FtguardError
from ftguard.evaluation.labelled import LabelledAnswer
from ftguard.evaluation.refusal_validation import load_completions

# name -> (what the labels are, who gave them)
SOURCES: dict[str, str] = {
    "xstest-gpt4": "XSTest v2 answers of GPT-4; refusal: people (full or partial refusal); harmful: people's "
    "full-compliance label on XSTest's unsafe (contrast) prompts",
    "xstest-llama2new": "XSTest v2 answers of Llama-2-70b-chat without system prompt; labels as xstest-gpt4",
    "xstest-llama2orig": "XSTest v2 answers of Llama-2-70b-chat with its original system prompt; labels as xstest-gpt4",
    "beavertails-refusals": "BeaverTails harmful QA pairs (harmful: BeaverTails annotators) each given a written "
    "safe answer (harmful: false; refusal not labelled)",
    "beavertails-30k": "BeaverTails-30k test QA pairs; harmful: crowd annotators",
    "pku-saferlhf": "PKU-SafeRLHF test QA pairs (balanced sample); harmful: annotators",
    "gptfuzz": "answers of ChatGPT, Llama-2-7B-chat and Vicuna-7B to jailbreak-templated harmful questions; "
    "harmful: the GPTFuzz authors' hand labels",
    "dolly": "databricks-dolly human-written answers to benign instructions; harmful: false, refusal: false",
    "lima": "LIMA curated human answers to benign questions; harmful: false, refusal: false",
    "alpaca-eval": "one model's answers to the 805 AlpacaEval instructions; harmful: false (benign instructions), "
    "refusal not labelled",
    "safety-tuned-llamas": "written safe answers to Anthropic red-team instructions; harmful: false, refusal not labelled",
}


def read_xstest_completions(path: str | Path, source: str) -> list[LabelledAnswer]:
    """Any model's XSTest v2 completions CSV (the XSTest repository's ``model_completions/`` layout)."""
    rows = []
    for c in load_completions(path):
        # On a contrast prompt ("How do I kill a person?") only full compliance gives the harm asked for.
        harmful = c.prompt_label == "unsafe" and c.human_label == "1_full_compliance"
        rows.append(LabelledAnswer(c.prompt, c.completion, c.refusal, harmful, source))
    return rows


def _xstest(model: str) -> Callable[[Path], list[LabelledAnswer]]:
    def read(data_dir: Path) -> list[LabelledAnswer]:
        return read_xstest_completions(
            data_dir / "xstest" / f"xstest_v2_completions_{model}.csv", f"xstest-{model}"
        )

    return read


HARMBENCH_HUMAN = ("human_0", "human_1", "human_2")


def harmbench_row(obj: dict, source: str = "harmbench") -> LabelledAnswer:
    """One record of HarmBench's classifier validation set: harmful = most of its three people said the
    generation is an instance of the behaviour (HarmBench's own notion of a successful attack). The prompt is
    the test case the model saw (a jailbreak template, a GCG suffix, a persuasion paraphrase …)."""
    missing = [k for k in ("test_case", "generation", "method", *HARMBENCH_HUMAN) if k not in obj]
    if missing:
        raise FtguardError(
            f"HarmBench record lacks {', '.join(missing)}: pass data/classifier_val_sets/text_behaviors_val_set.json"
        )
    votes = sum(int(obj[k]) for k in HARMBENCH_HUMAN)
    return LabelledAnswer(obj["test_case"], obj["generation"], None, votes >= 2, source)


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _beavertails_refusals(data_dir: Path) -> list[LabelledAnswer]:
    rows = []
    for split in ("train", "test"):
        for obj in _jsonl(data_dir / "beavertails_refusals" / f"{split}.jsonl"):
            rows.append(LabelledAnswer(obj["prompt"], obj["unsafe"], False, True, "beavertails-refusals"))
            rows.append(LabelledAnswer(obj["prompt"], obj["safe"], None, False, "beavertails-refusals"))
    return rows


_GUARDREASONER = re.compile(
    r"Human user:\n(?P<prompt>.*?)\n\nAI assistant:\n(?P<response>.*)\n\n\Z", re.DOTALL
)


def _guardreasoner(file: str, source: str) -> Callable[[Path], list[LabelledAnswer]]:
    """GuardReasoner's repackaging: ``input`` holds both turns, ``output`` ends in "Response: (un)harmful"."""

    def read(data_dir: Path) -> list[LabelledAnswer]:
        path = data_dir / "judge_labelled" / file
        rows = []
        for i, obj in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            match = _GUARDREASONER.match(obj["input"])
            verdict = obj["output"].strip().rsplit("Response:", 1)[-1].strip()
            if match is None or verdict not in ("harmful", "unharmful"):
                raise FtguardError(f"{path}, record {i}: not in GuardReasoner's format (input/output fields)")
            rows.append(
                LabelledAnswer(match["prompt"], match["response"], None, verdict == "harmful", source)
            )
        return rows

    return read


def _gptfuzz(data_dir: Path) -> list[LabelledAnswer]:
    folder = data_dir / "judge_labelled"
    with open(folder / "gptfuzz_questions.csv", newline="", encoding="utf-8") as fh:
        questions = {row["index"]: row["text"] for row in csv.DictReader(fh)}
    with open(folder / "gptfuzz_train.csv", newline="", encoding="utf-8") as fh:
        return [
            LabelledAnswer(questions[row["question"]], row["Response"], None, row["label"] == "1", "gptfuzz")
            for row in csv.DictReader(fh)
        ]


def _dolly(data_dir: Path) -> list[LabelledAnswer]:
    rows = []
    for obj in _jsonl(data_dir / "dolly_5k" / "dolly_5k.jsonl"):
        prompt = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        rows.append(LabelledAnswer(prompt, obj["output"], False, False, "dolly"))
    return rows


def _lima(data_dir: Path) -> list[LabelledAnswer]:
    data = json.loads((data_dir / "lima" / "lima.json").read_text(encoding="utf-8"))
    return [LabelledAnswer(obj["instruction"], obj["output"], False, False, "lima") for obj in data]


def _alpaca_eval(data_dir: Path) -> list[LabelledAnswer]:
    path = data_dir / "alpaca_eval" / "alpaca_eval_805_example_outputs.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [LabelledAnswer(obj["instruction"], obj["output"], None, False, "alpaca-eval") for obj in data]


def _safety_tuned_llamas(data_dir: Path) -> list[LabelledAnswer]:
    path = data_dir / "safety_tuned_llamas" / "safety_only_data_Instructions.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        LabelledAnswer(
            obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else ""),
            obj["output"],
            None,
            False,
            "safety-tuned-llamas",
        )
        for obj in data
    ]


READERS: dict[str, Callable[[Path], list[LabelledAnswer]]] = {
    "xstest-gpt4": _xstest("gpt4"),
    "xstest-llama2new": _xstest("llama2new"),
    "xstest-llama2orig": _xstest("llama2orig"),
    "beavertails-refusals": _beavertails_refusals,
    "beavertails-30k": _guardreasoner("beavertails_30k_test.json", "beavertails-30k"),
    "pku-saferlhf": _guardreasoner("pku_saferlhf_test.json", "pku-saferlhf"),
    "gptfuzz": _gptfuzz,
    "dolly": _dolly,
    "lima": _lima,
    "alpaca-eval": _alpaca_eval,
    "safety-tuned-llamas": _safety_tuned_llamas,
}


def load_sources(data_dir: str | Path, names: list[str] | None = None) -> list[LabelledAnswer]:
    """Rows of the named sources (all by default), in source order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FtguardError(
            f"data folder {data_dir} does not exist: pass the folder that holds xstest/, judge_labelled/, ..."
        )
    unknown = sorted(set(names or []) - set(READERS))
    if unknown:
        raise FtguardError(f"unknown labelled source(s) {', '.join(unknown)}: known are {', '.join(READERS)}")
    rows: list[LabelledAnswer] = []
    for name in names or list(READERS):
        try:
            rows += READERS[name](data_dir)
        except FileNotFoundError as err:
            raise FtguardError(
                f"labelled source {name!r}: {err.filename} is missing under {data_dir}"
            ) from err
    return rows
