"""Pure builders for the comparison view: data in, plotly figures or escaped HTML out (no widgets).

Every string that comes from data (inputs, references, outputs, variant names) is escaped before it
reaches HTML.
"""

from __future__ import annotations

import difflib
import html
from typing import Sequence

import plotly.graph_objects as go

COLOURS = ("#6b7280", "#2563eb", "#059669", "#7c3aed", "#d97706", "#db2777")


def diff_html(output: str, reference: str) -> str:
    """``output`` with the characters that differ from ``reference`` highlighted (red: not in the
    reference), escaped."""
    out = []
    matcher = difflib.SequenceMatcher(a=reference, b=output, autojunk=False)
    for op, _, _, j1, j2 in matcher.get_opcodes():
        piece = html.escape(output[j1:j2])
        if not piece:
            continue
        out.append(piece if op == "equal" else f"<span style='background:#fecaca'>{piece}</span>")
    return "".join(out) or "<i style='color:#6b7280'>(empty)</i>"


def items_table_html(rows: Sequence[dict], names: Sequence[str]) -> str:
    """The per-item table: input, reference and each variant's output (differences highlighted),
    green when the variant scored the item right."""
    if not rows:
        return "<i>no items to show with this filter</i>"
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for r in rows:
        cells = []
        for n in names:
            ok = bool(r["scores"].get(n))
            cells.append(f"<td style='background:{'#ecfdf5' if ok else '#fef2f2'}'>"
                         f"{diff_html(str(r['outputs'].get(n, '')), str(r['reference']))}</td>")
        body.append(f"<tr><td>{int(r['index'])}</td><td>{html.escape(str(r['input'])[:300])}</td>"
                    f"<td><b>{html.escape(str(r['reference'])[:200])}</b></td>{''.join(cells)}</tr>")
    return (f"<table class='sftkit-compare-items' style='font-size:12px'><tr><th>#</th><th>input</th>"
            f"<th>reference</th>{head}</tr>{''.join(body)}</table>")


def score_figure(names: Sequence[str], means: Sequence[float], lows: Sequence[float], highs: Sequence[float], *,
                 title: str, percent: bool = True) -> go.Figure:
    """One bar per variant with its confidence interval."""
    scale = 100.0 if percent else 1.0
    y = [m * scale for m in means]
    fig = go.Figure(go.Bar(
        x=[html.escape(str(n)) for n in names], y=y, marker_color=list(COLOURS[: len(names)]),
        error_y=dict(type="data", symmetric=False, array=[(h - m) * scale for h, m in zip(highs, means)],
                     arrayminus=[(m - lo) * scale for lo, m in zip(lows, means)])))
    fig.update_layout(title=html.escape(title), height=300, margin=dict(l=40, r=10, t=40, b=30),
                      yaxis_title="%" if percent else "")
    return fig


def summary_figures(result) -> list[go.Figure]:
    """One figure per metric family: the headline score (and macro-F1 for label tasks), text overlap
    (chrF, BLEU, ROUGE-L), and the reference answer's perplexity; each bar with its 95% interval."""
    names = list(result.variants)
    figs = []
    families = [(result.primary, f"{result.primary} (95% CI)", 1.0, True)]
    titles = {"chrf": "chrF (95% CI)", "bleu": "sentence BLEU, mean over items (95% CI)", "rouge_l": "ROUGE-L (95% CI)"}
    families += [(m, titles[m], 0.01 if m in ("chrf", "bleu") else 1.0, True)
                 for m in ("chrf", "bleu", "rouge_l") if m in result.metrics()]
    if "ref_ppl" in result.metrics():
        families.append(("ref_ppl", "perplexity of the reference answer (lower is better)", 1.0, False))
    for metric, title, scale, percent in families:
        stats = [result._mean_ci([v * scale for v in result.values(n, metric)]) for n in names]
        figs.append(score_figure(names, [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats],
                                 title=title, percent=percent))
        if metric == result.primary and result.labelled:  # label tasks: every class weighs the same
            stats = [result.macro_f1_ci(n) for n in names]
            figs.append(score_figure(names, [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats],
                                     title="macro-F1 over the classes (95% CI)"))
    return figs


def pairs_table_html(result) -> str:
    """Every pair of variants on the headline metric: difference, CI, McNemar p, wins/ties/losses, verdict."""
    if result.n == 0:
        return "<i>no results yet</i>"
    rows = []
    for p in result.pairs():
        d, t = p["diffs"].get(result.primary), p["mcnemar"]
        scale = 100.0 if t is not None else 1.0
        ci = f"{d.low * scale:+.1f} to {d.high * scale:+.1f}" if d else ""
        pv = "" if t is None else ("&lt; 0.001" if t.p_value < 0.001 else f"{t.p_value:.3f}")
        rows.append(f"<tr><td>{html.escape(p['a'])} &minus; {html.escape(p['b'])}</td>"
                    f"<td>{d.diff * scale:+.1f}</td><td>{ci}</td><td>{pv}</td>"
                    f"<td>{int(p['wins'])} / {int(p['ties'])} / {int(p['losses'])}</td>"
                    f"<td>{html.escape(result.verdict(p['a'], p['b']))}</td></tr>")
    return ("<table class='sftkit-compare-pairs' style='font-size:12px'><tr><th>pair</th><th>difference</th>"
            "<th>95% CI</th><th>McNemar p</th><th>wins / ties / losses</th><th>verdict</th></tr>"
            + "".join(rows) + "</table>")


def forgetting_html(result) -> str:
    """What each adapter cost elsewhere: perplexity on general text, base vs adapter, and the KL."""
    if not result.forgetting:
        return "<i>no adapter variant (or the comparison was stopped): no forgetting check</i>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{f.get('general_ppl_base', float('nan')):.2f}</td>"
        f"<td>{f.get('general_ppl_adapter', float('nan')):.2f}</td><td>{f.get('kl', float('nan')):.4f}</td></tr>"
        for name, f in result.forgetting.items())
    return ("<table class='sftkit-compare-forgetting' style='font-size:12px'><tr><th>adapter</th>"
            "<th>general-text perplexity, base</th><th>with the adapter</th><th>KL(base &#8214; adapter) per token"
            "</th></tr>" + rows + "</table>")
