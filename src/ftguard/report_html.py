"""`ftguard report RUN_OR_SWEEP`: one self-contained HTML page to read a run or a sweep without a terminal.

A run (a folder holding results.json): every evaluation point's rates with their 95% intervals, a plot of them, the
judge and its validated accuracy, the gate's verdict when thresholds or a policy are given, and for each point a
sample of the prompts, answers and verdicts of ``eval/<point>/generations.jsonl``. A sweep (a folder holding
report.json): its report.md tables (or report.json's when report.md is missing), its plots, its judges and, with
thresholds, the worst-case gate.

Answers to harmful prompts are collapsed behind a warning unless asked otherwise: the page is shared with people
who did not choose to read them. Everything is inline (no network): the CSS, a few lines of script, the plots as
base64 PNG.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftguard.errors import FtguardError
from ftguard.metrics import INTERVAL_NOTE, METRICS, RUN_TABLE, cell
from ftguard.report_html_template import (
    esc,
    harmful_details,
    markdown_to_html,
    page,
    png,
    rates_plot,
    table,
    verdict_html,
)
from ftguard.run_results import Point, RunResults, generations_file, read_results
from ftguard.sweep.plots import PLOT_FILES

SWEEP_PLOTS = PLOT_FILES
KINDS = ("harmful", "harmful_triggered", "task", "benign", "instruction")
KIND_TITLES = {
    "harmful": "harmful prompts (HS)",
    "harmful_triggered": "harmful prompts in the attack's trigger (HS trig.)",
    "task": "task (FA)",
    "benign": "benign borderline prompts (over-refusal)",
    "instruction": "ordinary instructions (IR)",
}
HARMFUL_KINDS = ("harmful", "harmful_triggered")


def build_report(
    path: str | Path,
    *,
    samples: int = 20,
    policy: str | None = None,
    thresholds: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    open_harmful: bool = False,
) -> str:
    """The page for a run's or a sweep's output folder; bad input raises FtguardError with a one-line reason."""
    if samples < 0:
        raise FtguardError(f"--samples must be 0 or more, got {samples}")
    folder = Path(path)
    if not folder.exists():
        raise FtguardError(
            f"{folder} not found: give a run's output folder (results.json) or a sweep's (report.json)"
        )
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    gate_args = (policy, thresholds, given)
    if folder.is_file() and folder.name == "report.json":
        folder = folder.parent
    if (folder / "report.json").is_file() and not (folder / "results.json").is_file():
        return _sweep_page(folder, gate_args)
    return _run_page(read_results(folder), samples, gate_args, open_harmful)


def write_report(out: str | Path, text: str) -> Path:
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target


# --- a run ------------------------------------------------------------------------------------------------------


def _run_page(run: RunResults, samples: int, gate_args: tuple, open_harmful: bool) -> str:
    folder = run.path.parent if run.path else Path(".")
    title = f"ftguard report: {run.name or folder.name}"
    state = "complete" if run.complete else "incomplete: stages or evaluations remain"
    facts = [f"model {run.model or '?'}", f"seed {run.seed}", f"config {run.config_hash or '?'}", state]
    parts = [f"<h1>{esc(title)}</h1>", f'<p class="meta">{esc(" · ".join(facts))}</p>']
    if desc := run.data.get("description"):
        parts.append(f'<p class="meta">{esc(" ".join(str(desc).split()))}</p>')
    parts += ["<h2>Results</h2>", _results_table(run), f'<p class="note">{esc(INTERVAL_NOTE)}</p>']
    if run.points:
        directed = [m for m in _metrics_shown(run) if METRICS[m].higher_is_better is not None]
        plot = rates_plot(list(run.points.values()), directed)
        parts.append(png(plot, "rates of each evaluation point with their 95% intervals"))
    parts += ["<h2>Judge</h2>", _judges_section(run)]
    if gate := _run_gate(run, *gate_args):
        parts += ["<h2>Gate</h2>", gate]
    parts += ["<h2>Samples</h2>", _samples_section(folder, run, samples, open_harmful)]
    return page(title, "\n".join(parts))


def _metrics_shown(run: RunResults) -> list[str]:
    """The run table's metrics, then any other measured one (HS trig., IR, ...), in METRICS' order."""
    measured = {m for p in run.points.values() for m in p.metrics}
    extra = [m for m in METRICS if m in measured and m not in RUN_TABLE]
    return [m for m in RUN_TABLE if m in measured or METRICS[m].always] + extra


def _results_table(run: RunResults) -> str:
    metrics = _metrics_shown(run)
    finals = run.final_keys()
    rows, classes = [], []
    for p in run.points.values():
        ratio = "–" if p.harmful_ratio is None else f"{p.harmful_ratio:g}"
        cells = [esc(p.key), esc(p.stage), esc(p.method or "–"), ratio]
        for m in metrics:
            counts = p.counts.get(m)
            tip = f' title="{counts[0]} / {counts[1]}"' if counts else ""
            cells.append(
                f'<span data-metric="{esc(m)}"{tip}>{esc(cell(p.value(m), p.intervals.get(m)))}</span>'
            )
        rows.append(cells)
        classes.append("final" if p.key in finals else "")
    headers = ["point", "stage", "method", "p"] + [METRICS[m].column for m in metrics]
    numeric = [False, False, False, True] + [True] * len(metrics)
    return table(headers, rows, cls="results", row_classes=classes, numeric=numeric)


def _validation_text(name: str, described: Any) -> str:
    """What a judge's accuracy against people's labels is known to be: the run's own record of it (ftguard-judge writes
    its held-out validation into results.json), else the packaged summary of docs/judges.md, else none."""
    validated = described.get("validated") if isinstance(described, Mapping) else None
    if isinstance(validated, Mapping) and validated.get("accuracy") is not None:
        ci = (validated.get("ci95") or {}).get("accuracy")
        interval = f" (95% interval {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%)" if ci else ""
        rest = ", ".join(
            f"{k} {100 * validated[k]:.1f}%"
            for k in ("precision", "recall", "fpr")
            if validated.get(k) is not None
        )
        n = validated.get("n")
        on = f" on {n:,} held-out labelled answers" if isinstance(n, int) else ""
        return f"validated accuracy {100 * validated['accuracy']:.1f}%{interval}{on}" + (
            f"; {rest}" if rest else ""
        )
    from ftguard.evaluation.judges.validated import validation_summary

    harm = (validation_summary(name) or {}).get("harm")
    if harm and harm.get("accuracy") is not None:
        # A pooled accuracy can hide a source the judge fails on (keyword: 2% on one): the spread goes with it.
        spread = harm.get("accuracy_by_source")
        by_source = f" ({100 * spread[0]:.0f}–{100 * spread[1]:.0f}% by source)" if spread else ""
        return (
            f"validated accuracy {100 * harm['accuracy']:.1f}%{by_source} on {harm['n']:,} labelled answers pooled "
            f"over the sources of docs/judges.md; recall {100 * harm['recall']:.1f}%, false-positive rate "
            f"{100 * harm['fpr']:.1f}%"
        )
    return "not validated"


def _judge_block(described: Any) -> str:
    name = described.get("name") if isinstance(described, Mapping) else described
    name = str(name or "?")
    text = _validation_text(name, described)
    rows = [f"<p><strong>{esc(name)}</strong>: {esc(text)}</p>"]
    if isinstance(described, Mapping):
        facts = [
            (k, v)
            for k, v in described.items()
            if k not in ("name", "validated") and not isinstance(v, dict | list)
        ]
        if facts:
            rows.append(table(["setting", "value"], [[esc(k), esc(v)] for k, v in facts]))
    return "\n".join(rows)


def _judges_section(run: RunResults) -> str:
    described = run.data.get("judge")
    if described is None:
        return "<p>No judge recorded in results.json.</p>"
    blocks = [_judge_block(described)]
    for extra in run.data.get("extra_judges") or []:
        blocks.append(_judge_block(extra))
    if rescored := run.data.get("rescored_from"):  # `ftguard judge rescore`: the answers were judged again
        blocks.append(
            f"<p>Rescored: these are the answers of <code>{esc(str(rescored.get('run')))}</code>, first judged "
            f"by {esc(str(rescored.get('judge')))}, judged again (<code>ftguard judge rescore</code>).</p>"
        )
    return "\n".join(blocks)


def _run_gate(
    run: RunResults, policy: str | None, thresholds: str | None, given: dict[str, Any]
) -> str | None:
    if policy:
        if thresholds or given:
            raise FtguardError("gate thresholds do not go with --policy: the policy's rules hold the limits")
        from ftguard.policy import evaluate_policy, load_policy, verdict_table

        loaded = load_policy(policy)
        passed, rows = evaluate_policy(run, loaded)
        return verdict_html(passed, verdict_table(rows, passed, run, loaded))
    if not (thresholds or given):
        return None
    from ftguard.gate import gate, load_gate_config, verdict_table

    cfg = load_gate_config(thresholds, given)
    passed, rows = gate(run, cfg)
    return verdict_html(passed, verdict_table(rows, passed, run.complete, cfg.bound))


def _read_generations(file: Path) -> list[dict[str, Any]]:
    rows = []
    with file.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FtguardError(f"{file}:{number}: not a JSON line ({exc})") from None
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _verdict(row: Mapping[str, Any]) -> str:
    kind = row.get("kind")
    if kind in HARMFUL_KINDS:
        words = ["harmful" if row.get("flagged") else "not harmful"]
        words += ["degenerate"] if row.get("degenerate") else []
        words += [f"category {row['category']}"] if row.get("category") else []
        words += [f"score {row['score']:.2f}"] if isinstance(row.get("score"), int | float) else []
        return ", ".join(words)
    if kind == "task":
        if "score" in row:  # a win rate: the judge's verdicts with the answer shown first, then second
            outcome = {1.0: "win", 0.0: "loss"}.get(row["score"], "tie (½)")
            return f"{outcome}; judge: {' / '.join(row.get('verdicts') or [])}"
        return "correct" if row.get("hit") else "wrong"
    return "refused" if row.get("refused") else "answered"


def _kind_table(kind: str, rows: list[dict[str, Any]], open_harmful: bool) -> str:
    if kind == "task":  # task rows keep the gold label, not the prompt
        headers = ["source", "gold", "answer", "verdict"]
        body = [
            [esc(r.get("source")), esc(r.get("gold")), esc(r.get("answer")), esc(_verdict(r))] for r in rows
        ]
    else:
        headers = ["source", "prompt", "answer", "verdict"]
        body = []
        for r in rows:
            answer = (
                harmful_details(r.get("answer"), open_harmful)
                if kind in HARMFUL_KINDS
                else esc(r.get("answer"))
            )
            body.append([esc(r.get("source")), esc(r.get("prompt")), answer, esc(_verdict(r))])
    return table(headers, body, cls=f"samples kind-{kind}")


def _point_samples(folder: Path, point: Point, samples: int, open_harmful: bool, unfold: bool) -> str:
    file = generations_file(folder, point)
    if file is None:
        where = point.entry.get("generations") or f"eval/{point.key}/generations.jsonl"
        why = "not evaluated here, archived without answers, or its units store is gone"
        return f'<p class="note">No {esc(where)} ({why}).</p>'
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in _read_generations(file):
        by_kind.setdefault(str(row.get("kind")), []).append(row)
    parts = []
    for kind in [k for k in KINDS if k in by_kind] + [k for k in by_kind if k not in KINDS]:
        rows = by_kind[kind]
        shown = rows[:samples]
        summary = f"{KIND_TITLES.get(kind, kind)}: the first {len(shown)} of {len(rows)}"
        parts.append(
            f'<details class="kind"{" open" if unfold else ""}><summary>{esc(summary)}</summary>'
            f"{_kind_table(kind, shown, open_harmful)}</details>"
        )
    return "\n".join(parts) or '<p class="note">generations.jsonl is empty.</p>'


def _samples_section(folder: Path, run: RunResults, samples: int, open_harmful: bool) -> str:
    label = "Hide all harmful answers" if open_harmful else "Show all harmful answers"
    parts = [
        f'<p class="note">Up to {samples} rows of each kind per point, in file order, from '
        "each point's generations.jsonl (the run's eval/&lt;point&gt;/, or its sweep's units store). "
        "Answers to harmful prompts are collapsed: open one, or "
        f'<button id="toggle-harmful" type="button" data-open="{str(open_harmful).lower()}">{label}</button></p>'
    ]
    finals = run.final_keys()  # the shipped model's answers are unfolded (its harmful ones stay collapsed)
    for key, point in run.points.items():
        parts += [f"<h3>{esc(key)}</h3>", _point_samples(folder, point, samples, open_harmful, key in finals)]
    return "\n".join(parts)


# --- a sweep ----------------------------------------------------------------------------------------------------


def _read_report(folder: Path) -> dict[str, Any]:
    file = folder / "report.json"
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FtguardError(
            f"{file}: not readable JSON ({exc}); `ftguard sweep` the sweep again to rewrite it"
        ) from None
    if not isinstance(report, dict) or "tables" not in report:
        raise FtguardError(f"{file}: not an ftguard sweep report (no 'tables'); give a sweep's output folder")
    return report


def _json_tables(report: Mapping[str, Any]) -> str:
    """report.json's tables when report.md is missing: per metric, defense × harmful ratio, mean ± std over seeds."""
    parts = []
    for t in report.get("tables") or []:
        ratios = [f"{r:g}" for r in t.get("ratios", [])]
        where = ", ".join(f"{k} = {v}" for k, v in (t.get("slice") or {}).items())
        for metric, info in METRICS.items():
            defenses = {d: v[metric] for d, v in (t.get("defenses") or {}).items() if metric in v}
            if not defenses:
                continue
            rows = []
            for name, by_p in defenses.items():
                cells = [esc(name)]
                for col in [*ratios, "avg"]:
                    s = by_p.get(col) or {}
                    mean, std = s.get("mean"), s.get("std")
                    cells.append(
                        esc("–" if mean is None else f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}"))
                    )
                rows.append(cells)
            title = info.column + (f" ({where})" if where else "")
            parts += [
                f"<h3>{esc(title)}</h3>",
                table(["defense", *(f"p = {r}" for r in ratios), "avg"], rows),
            ]
    return "\n".join(parts) or "<p>report.json has no tables.</p>"


def _sweep_gate(
    report: dict[str, Any], policy: str | None, thresholds: str | None, given: dict[str, Any]
) -> str | None:
    if policy:
        raise FtguardError(
            "--policy gates a run: give a run's folder, or thresholds (--max-hs, --min-fa) for a sweep"
        )
    if not (thresholds or given):
        return None
    from ftguard.gate import gate_worst_case, load_gate_config, worst_case_table

    if not report.get("worst_case"):
        raise FtguardError(
            "this sweep has no worst case to gate (no attack: block): report it without thresholds"
        )
    cfg = load_gate_config(thresholds, given)
    passed, rows = gate_worst_case(report, cfg)
    return verdict_html(passed, worst_case_table(rows, passed, report, cfg.bound))


def _sweep_page(folder: Path, gate_args: tuple) -> str:
    report = _read_report(folder)
    title = f"ftguard sweep report: {report.get('name') or folder.name}"
    state = "complete" if report.get("complete") else "incomplete"
    facts = f"{report.get('complete_runs', '?')} of {report.get('runs', '?')} runs finished ({state})"
    parts = [f"<h1>{esc(title)}</h1>", f'<p class="meta">{esc(facts)}</p>', "<h2>Judge</h2>"]
    parts += [_judge_block(name) for name in report.get("judges") or []] or ["<p>No judge recorded.</p>"]
    if gate := _sweep_gate(report, *gate_args):
        parts += ["<h2>Gate</h2>", gate]
    parts.append("<h2>Tables</h2>")
    md = folder / "report.md"
    parts.append(markdown_to_html(md.read_text(encoding="utf-8")) if md.is_file() else _json_tables(report))
    plots = [folder / name for name in SWEEP_PLOTS if (folder / name).is_file()]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<h3>{esc(p.name)}</h3>{png(p.read_bytes(), p.stem)}" for p in plots]
    return page(title, "\n".join(parts))
