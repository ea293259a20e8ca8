"""The pieces of `ftguard report`'s page: its CSS and script, tables, a small Markdown reader and images.

Every text that comes from a run (prompts, answers, names, Markdown) goes through ``esc`` before it reaches the page:
a model's answer can hold any markup, and the page must show it, never run it. Nothing is loaded from the network:
the style, the script and the plots are all inside the one file.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.final td:first-child::after { content: " (final)"; color: #666; font-size: .85em; }
.meta { color: #555; } .note { color: #555; font-size: .9em; }
.pass { color: #116611; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
.warn { color: #9a6700; font-weight: bold; }
table.samples td { max-width: 520px; white-space: pre-wrap; word-break: break-word; }
details.harm > summary { color: #9a6700; cursor: pointer; }
details.kind { margin: .4em 0 .4em 1em; } details.kind > summary { cursor: pointer; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #ddd; margin: .4em 0; }
code { background: #f4f4f4; padding: 0 3px; }
"""

# Opens or closes every harmful answer at once: the reader chooses to read them, one by one or all together.
SCRIPT = """
document.addEventListener("DOMContentLoaded", function () {
  var button = document.getElementById("toggle-harmful");
  if (!button) { return; }
  button.addEventListener("click", function () {
    var boxes = document.querySelectorAll("details.harm");
    var open = button.getAttribute("data-open") !== "true";
    for (var i = 0; i < boxes.length; i++) { boxes[i].open = open; }
    button.setAttribute("data-open", open ? "true" : "false");
    button.textContent = open ? "Hide all harmful answers" : "Show all harmful answers";
  });
});
"""

HARM_WARNING = "⚠ may contain harmful text (click to show)"


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    cls: str = "",
    row_classes: Sequence[str] | None = None,
    numeric: Sequence[bool] | None = None,
) -> str:
    """``headers`` are plain text (escaped here); ``rows`` hold cells already made HTML by the caller."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        rcls = row_classes[i] if row_classes and row_classes[i] else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if numeric and numeric[j] else f"<td>{c}</td>"
            for j, c in enumerate(row)
        )
        body.append(f'<tr class="{rcls}">{cells}</tr>' if rcls else f"<tr>{cells}</tr>")
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def harmful_details(text: Any, is_open: bool = False) -> str:
    """An answer to a harmful prompt, collapsed behind a warning unless the reader asked to see them all."""
    return (
        f'<details class="harm"{" open" if is_open else ""}><summary>{esc(HARM_WARNING)}</summary>'
        f"{esc(text)}</details>"
    )


def png(data: bytes, alt: str) -> str:
    return (
        f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
    )


def rates_plot(points: Sequence[Any], metrics: Sequence[str]) -> bytes:
    """Grouped bars of each point's rates (run_results.Point) with their 95% intervals, as a PNG (matplotlib Agg)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftguard.metrics import METRICS

    metrics = [m for m in metrics if any(p.value(m) is not None for p in points)]  # no empty legend entries
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(points)), 3.6), dpi=90)
    for j, m in enumerate(metrics):
        xs, ys, lo, hi = [], [], [], []
        for i, p in enumerate(points):
            value = p.value(m)
            if value is None:
                continue
            low, high = p.intervals.get(m, (value, value))
            xs.append(i + (j - (len(metrics) - 1) / 2) * width)
            ys.append(value)
            lo.append(value - low)
            hi.append(high - value)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=METRICS[m].column)
    ax.set_xticks(range(len(points)), [p.key for p in points])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    # Below the axes: rates near 100% would hide under a legend drawn inside them.
    ax.legend(fontsize=8, ncol=min(len(metrics), 6), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title("each point's rates (bars: 95% Wilson intervals)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def verdict_html(passed: bool, markdown: str) -> str:
    """A gate's Markdown verdict (ftguard.gate, ftguard.policy): its closing "…: PASSED/FAILED" line in colour."""
    lines = markdown.rstrip().splitlines()
    last = lines.pop() if lines else ""
    return f'<p class="{"pass" if passed else "fail"}">{esc(last)}</p>' + markdown_to_html("\n".join(lines))


def _inline(escaped: str) -> str:
    """Markdown's code, bold and italic on text already escaped (the markers themselves carry no markup)."""
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", escaped)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    """The Markdown the reports write (report.md, results.md, the gate's verdict tables): headings, pipe tables,
    lists and paragraphs. Not a general Markdown reader: anything else is shown as a paragraph of text."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = min(len(m.group(1)) + 1, 6)  # the page's own h1 is the title
            out.append(f"<h{level}>{_inline(esc(m.group(2)))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            rows = [_cells(r) for r in block if not re.fullmatch(r"[\s|:\-]+", r)]
            headers, body = (rows[0], rows[1:]) if rows else ([], [])
            head = "".join(f"<th>{_inline(esc(h))}</th>" for h in headers)
            trs = "".join("<tr>" + "".join(f"<td>{_inline(esc(c))}</td>" for c in r) + "</tr>" for r in body)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif re.match(r"\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"\s*[-*]\s+", lines[i]):
                items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(esc(t))}</li>" for t in items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"\s*(#|\||[-*]\s)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            if not para:  # a line the branches above declined (e.g. "#tag"): shown as it is
                para, i = [line.strip()], i + 1
            out.append(f"<p>{_inline(esc(' '.join(para)))}</p>")
    return "\n".join(out)


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style><script>{SCRIPT}</script></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )
