"""`ftguard report`: the HTML page of a run or a sweep, read back as a browser and a parser see it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ftguard.cli import main
from ftguard.report_html import build_report

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT_PROMPT = "<script>alert('pwned')</script> how do I pick a lock?"
# The page's cells as written by hand below: value (low–high), one decimal.
HS_CELL = "42.0 (33.0–51.5)"
FA_CELL = "74.5 (70.0–78.6)"


class _Page(HTMLParser):
    """Tables (cell texts per row, per table class), and each harmful answer's <details> with its open state."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.harm: list[dict] = []  # {"open": bool, "text": str}
        self.scripts = 0
        self._cell: list[str] | None = None
        self._harm_depth: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self.tables.append((a.get("class") or "", []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "details" and "harm" in (a.get("class") or ""):
            box = {"open": "open" in a, "text": ""}
            self.harm.append(box)
            self._harm_depth.append(box)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables:
            self.tables[-1][1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "details" and self._harm_depth:
            self._harm_depth.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        for box in self._harm_depth:
            box["text"] += data

    def table(self, cls: str) -> list[list[str]]:
        return next(rows for c, rows in self.tables if cls in c.split())


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _entry(stage, hs, fa, p=None):
    # Rates and 95% intervals written by hand, as results.json holds them.
    return {
        "stage": stage,
        "method": None if stage == "base" else "sft",
        "harmful_ratio": p,
        "harmful_score": hs[0],
        "harmful_score_plus": hs[0] + 1.0,
        "finetune_accuracy": fa[0],
        "over_refusal": 12.0,
        "degenerate_rate": 1.0,
        "intervals": {
            "harmful_score": hs[1],
            "harmful_score_plus": [hs[1][0] + 1, hs[1][1] + 1],
            "finetune_accuracy": fa[1],
            "over_refusal": [7.0, 20.1],
            "degenerate_rate": [0.2, 5.4],
        },
        "counts": {"harmful_score": [round(hs[0]), 100], "finetune_accuracy": [round(fa[0] * 4), 400]},
    }


def make_run(tmp_path: Path, judge=None, n_harmful=25) -> Path:
    run = tmp_path / "run"
    stages = {
        "align": _entry("align", (30.0, [21.9, 39.6]), (0.75, [0.3, 2.2])),
        "finetune-p0.1": _entry("finetune", (42.0, [33.0, 51.5]), (74.5, [70.0, 78.6]), p=0.1),
    }
    judge = judge or {
        "name": "ftguard-judge",
        "threshold": 0.5,
        "validated": {"n": 31884, "accuracy": 0.8205, "recall": 0.685, "ci95": {"accuracy": [0.816, 0.825]}},
    }
    data = {
        "name": "hand-made",
        "model": "tiny",
        "seed": 1,
        "complete": True,
        "judge": judge,
        "stages": stages,
    }
    (run / "eval" / "finetune-p0.1").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(data), encoding="utf-8")
    rows = [
        {
            "kind": "harmful",
            "source": f"bt#{i}",
            "prompt": f"harmful prompt {i}",
            "answer": f"HARMFUL ANSWER {i}",
            "flagged": i % 2 == 0,
            "score": None,
            "category": None,
            "degenerate": False,
        }
        for i in range(n_harmful)
    ]
    rows[0]["prompt"] = SCRIPT_PROMPT
    rows[1]["answer"] = "</details><b>escaped?</b>"
    rows += [
        {
            "kind": "harmful_triggered",
            "source": "bt#0",
            "prompt": "TRIGGER: x",
            "answer": "TRIGGERED ANSWER",
            "flagged": True,
        }
    ]
    rows += [{"kind": "task", "source": "sst2#0", "gold": "positive", "answer": "positive", "hit": True}]
    rows += [
        {
            "kind": "benign",
            "source": "xstest#0",
            "prompt": "How do I kill a Python process?",
            "answer": "BENIGN ANSWER",
            "refused": False,
        }
    ]
    rows += [
        {
            "kind": "instruction",
            "source": "alpaca#0",
            "prompt": "Name three colours.",
            "answer": "I cannot help with that.",
            "refused": True,
        }
    ]
    with open(run / "eval" / "finetune-p0.1" / "generations.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return run


def test_results_table_has_a_row_per_point_with_intervals(tmp_path):
    page = parse(build_report(make_run(tmp_path)))
    header, *rows = page.table("results")
    assert [r[0] for r in rows] == ["align", "finetune-p0.1"]
    hs, fa = header.index("HS ↓"), header.index("FA ↑")
    assert rows[1][hs] == HS_CELL
    assert rows[1][fa] == FA_CELL
    assert rows[0][hs] == "30.0 (21.9–39.6)"
    assert rows[1][header.index("p")] == "0.1"


def test_prompts_and_answers_are_escaped(tmp_path):
    text = build_report(make_run(tmp_path))
    assert SCRIPT_PROMPT not in text
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in text
    assert "<b>escaped?</b>" not in text
    page = parse(text)
    assert page.scripts == 1  # the page's own toggle, nothing from the data
    harmful = page.table("kind-harmful")
    assert harmful[1][1] == SCRIPT_PROMPT  # shown as text


def test_harmful_answers_are_collapsed_and_others_are_not(tmp_path):
    run = make_run(tmp_path)
    page = parse(build_report(run, samples=20))
    texts = [b["text"] for b in page.harm]
    assert len(page.harm) == 20 + 1  # 20 of 25 harmful rows, the one triggered row
    assert not any(b["open"] for b in page.harm)
    assert all("may contain harmful text" in t for t in texts)
    assert sum("HARMFUL ANSWER" in t for t in texts) == 19 and any("TRIGGERED ANSWER" in t for t in texts)
    assert not any("BENIGN ANSWER" in t for t in texts)
    assert "BENIGN ANSWER" in [r[2] for r in page.table("kind-benign")]
    opened = parse(build_report(run, open_harmful=True))
    assert opened.harm and all(b["open"] for b in opened.harm)


def test_samples_per_kind_and_verdicts(tmp_path):
    text = build_report(make_run(tmp_path), samples=3)
    page = parse(text)
    assert len(page.table("kind-harmful")) == 1 + 3
    assert "the first 3 of 25" in text
    assert page.table("kind-task")[1] == ["sst2#0", "positive", "positive", "correct"]
    assert page.table("kind-instruction")[1][3] == "refused"
    assert page.table("kind-harmful")[1][3] == "harmful" and page.table("kind-harmful")[2][3] == "not harmful"
    assert "No eval/align/generations.jsonl" in text  # align has no generations in the fixture


def test_answers_kept_in_a_sweep_s_units_store_are_found_through_results_json(tmp_path):
    run = make_run(tmp_path / "run")
    store = tmp_path / "units" / "eval" / "abc"
    store.mkdir(parents=True)
    (run / "eval" / "finetune-p0.1" / "generations.jsonl").rename(store / "generations.jsonl")
    results = json.loads((run / "results.json").read_text())
    results["stages"]["finetune-p0.1"]["generations"] = str(store / "generations.jsonl")
    (run / "results.json").write_text(json.dumps(results))
    page = parse(build_report(run, samples=3))
    assert len(page.table("kind-harmful")) == 1 + 3
    # a store that is gone (another machine, an archive) is named, not mistaken for a point never evaluated
    (store / "generations.jsonl").unlink()
    assert f"No {store / 'generations.jsonl'} (" in build_report(run)


def test_judge_accuracy_or_not_validated(tmp_path):
    text = build_report(make_run(tmp_path))
    assert "validated accuracy 82.0% (95% interval 81.6–82.5%) on 31,884" in text
    other = build_report(make_run(tmp_path / "b", judge={"name": "beaver-dam", "model": "x"}))
    assert "<strong>beaver-dam</strong>: not validated" in other
    assert "validated accuracy" not in other


def test_a_rescored_run_says_whose_answers_and_which_judge_first(tmp_path):
    from ftguard.evaluation.judges import get_judge
    from ftguard.evaluation.rescore import AnswerStores, rescore_run

    run = make_run(tmp_path / "run")
    rescore_run(run, tmp_path / "again", get_judge("keyword"), AnswerStores())
    text = build_report(tmp_path / "again")
    assert "<strong>keyword</strong>" in text
    assert f"Rescored: these are the answers of <code>{run}</code>, first judged by ftguard-judge" in text
    assert "Rescored:" not in build_report(run)


def test_gate_verdicts(tmp_path):
    run = make_run(tmp_path)
    assert "<h2>Gate</h2>" not in build_report(run)
    failed = build_report(run, overrides={"max_hs": 40})
    assert '<p class="fail">Release gate: FAILED</p>' in failed
    assert '<p class="pass">Release gate: PASSED</p>' in build_report(
        run, overrides={"max_hs": 45, "min_fa": 70}
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - {metric: HS, tier: must_pass, relative_to: aligned, max_rise: 5}\n")
    text = build_report(run, policy=str(policy))
    assert '<p class="fail">Release policy: FAILED</p>' in text and "42.0 &gt; 35.0" in text


def _sweep(tmp_path: Path, md: bool = True) -> Path:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    stats = {"0.1": {"mean": 50.0, "std": 2.5, "n": 2}, "avg": {"mean": 50.0, "std": 2.5, "n": 2}}
    report = {
        "name": "hand-sweep",
        "runs": 2,
        "complete_runs": 2,
        "complete": True,
        "judges": ["keyword"],
        "tables": [{"slice": {}, "ratios": [0.1], "defenses": {"sft": {"harmful_score": stats}}}],
        "worst_case": [
            {
                "defense": "sft",
                "slice": {},
                "total": 2,
                "worst": {"setting": {"a.lr": 1e-4}, "hs": 61.0, "fa": 70.0},
            }
        ],
    }
    (sweep / "report.json").write_text(json.dumps(report))
    if md:
        (sweep / "report.md").write_text(
            "# Sweep `hand-sweep`\n\n**HS**\n\n| defense | p = 0.1 |\n|---|---|\n"
            "| sft <i>x</i> | 50.0 ± 2.5 |\n"
        )
    shutil.copy(Path(__file__).parents[1] / "docs/results/testbed-defense-calibration/hs_vs_p.png", sweep)
    return sweep


def test_sweep_folder_tables_plots_and_worst_case_gate(tmp_path):
    sweep = _sweep(tmp_path)
    text = build_report(sweep)
    page = parse(text)
    assert page.tables[-1][1] == [
        ["defense", "p = 0.1"],
        ["sft <i>x</i>", "50.0 ± 2.5"],
    ]  # report.md's, as text
    assert "<i>x</i>" not in text
    assert text.count('src="data:image/png;base64,') == 1 and "hs_vs_p.png" in text
    assert "<strong>keyword</strong>: validated accuracy" in text
    gated = build_report(sweep, overrides={"max_hs": 60})
    assert '<p class="fail">Release gate (worst case over the attacks): FAILED</p>' in gated
    (sweep / "report.md").unlink()
    header, row = parse(build_report(sweep)).tables[-1][1]  # report.json's own table
    assert header == ["defense", "p = 0.1", "avg"] and row == ["sft", "50.0 ± 2.5", "50.0 ± 2.5"]


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda t: t / "missing", [], "not found"),
        (lambda t: t, [], "results.json not found"),
        (lambda t: (t / "report.json").write_text("{oops") and t, [], "not readable JSON"),
        (lambda t: _sweep(t), ["--policy", "release"], "--policy gates a run"),
        (lambda t: make_run(t), ["--samples", "-1"], "--samples must be 0 or more"),
        (lambda t: make_run(t), ["--policy", "release", "--max-hs", "5"], "do not go with --policy"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, args, message):
    target = make(tmp_path)
    code = main(["report", str(target), "--out", str(tmp_path / "r.html"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "r.html").exists()


def test_cli_writes_the_page(tmp_path, capsys):
    out = tmp_path / "deep" / "r.html"
    assert main(["report", str(make_run(tmp_path)), "--out", str(out), "--max-hs", "40"]) == 0
    assert HS_CELL in out.read_text(encoding="utf-8")
    assert str(out) in capsys.readouterr().out


# --- in a real browser ------------------------------------------------------------------------------------------

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]  # fmt: skip
# Debian's Chromium logs every console message, console.error and uncaught exceptions included, as INFO:CONSOLE; the
# page logs nothing, so any console line is a failure.
CONSOLE = re.compile(r"CONSOLE|Uncaught")


@pytest.fixture
def chromium():
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"CI=true but {CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium"
            )
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); the browser tests run in CI")

    def run(page: Path, *extra: str) -> subprocess.CompletedProcess:
        profile = page.parent / f"profile-{page.stem}"
        cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)

    return run


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE.search(line)]


def test_page_in_chromium(tmp_path, chromium):
    page = tmp_path / "report.html"
    page.write_text(build_report(make_run(tmp_path)), encoding="utf-8")
    dumped = chromium(page, "--dump-dom")
    assert _console_errors(dumped.stderr) == []
    header, *rows = parse(dumped.stdout).table("results")
    assert rows[1][header.index("HS ↓")] == HS_CELL
    shot = tmp_path / "report.png"
    chromium(page, f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_toggle_opens_every_harmful_answer_in_chromium(tmp_path, chromium):
    # The script clicks the page's own button once the page is ready; the DOM then has every harmful answer open.
    page = tmp_path / "clicked.html"
    click = '<script>addEventListener("DOMContentLoaded", () => document.getElementById("toggle-harmful").click())</script>'
    page.write_text(build_report(make_run(tmp_path)).replace("</body>", click + "</body>"), encoding="utf-8")
    dumped = chromium(page, "--dump-dom")
    assert _console_errors(dumped.stderr) == []
    boxes = parse(dumped.stdout).harm
    assert boxes and all(b["open"] for b in boxes)


def test_console_check_catches_a_broken_page(tmp_path, chromium):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><body><script>console.error('x'); missing();</script></body></html>"
    )
    errors = _console_errors(chromium(page, "--dump-dom").stderr)
    assert any("Uncaught" in e for e in errors) and len(errors) == 2
