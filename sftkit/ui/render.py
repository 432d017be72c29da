"""Pure HTML builders for the views: data in, an HTML string out (tested without a browser)."""

from __future__ import annotations

import html
from typing import Sequence

from ..core.tokens import TokenPiece

TRAINED_BG = "#c8f7c5"
MASKED_BG = "#eeeeee"
SPECIAL_BORDER = "#7b61ff"
VIRTUAL_BG = "#ede9fe"  # a prompt method's virtual tokens: input positions (prompt tuning, p-tuning)
VIRTUAL_INSIDE_BG = "#fef3c7"  # ... or keys/values inside every block's attention (prefix tuning, LLaMA-Adapter)
VIRTUAL_INPUT = ("prompt_tuning", "p_tuning")
ROLE_COLOURS = {"system": "#6b7280", "example": "#b45309", "user": "#1d4ed8",
                "answer": "#15803d", "end": "#15803d", "other": "#6b7280", "prompt": "#374151"}

LEGEND = (
    f'<span style="background:{TRAINED_BG};padding:0 4px">trained</span> '
    f'<span style="background:{MASKED_BG};padding:0 4px">masked (context only)</span> '
    f'<span style="border:1px solid {SPECIAL_BORDER};padding:0 4px">special token</span>'
)


def _visible(text: str) -> str:
    out = html.escape(text)
    out = out.replace(" ", "&nbsp;").replace("\t", "&rarr;")
    return out.replace("\n", '<span style="color:#999">&#8629;</span><br>')


def virtual_html(n: int, method: str, label: str) -> str:
    """A prompt method's ``n`` virtual tokens as spans (``v0`` ...), dashed, in a colour of their own (they are
    trained embeddings, never labels), after a line that says what they are (``label``, escaped)."""
    inside = method not in VIRTUAL_INPUT
    bg, kind = (VIRTUAL_INSIDE_BG, "keys and values in the attention") if inside else (VIRTUAL_BG, "input position")
    spans = "".join(
        f'<span class="sftkit-virtual" data-virtual="{i}" data-method="{html.escape(method, quote=True)}" '
        f'title="virtual token {i} of {n}: trained {kind}, not text; never a label" '
        f'style="background:{bg};border:1px dashed {SPECIAL_BORDER};'
        f'color:{SPECIAL_BORDER};font-style:italic;border-radius:2px;margin:0 1px 1px 0">v{i}</span>'
        for i in range(n))
    return (f'<div class="sftkit-virtual-label" style="color:#4b5563;font-size:12px">{html.escape(label)}</div>'
            f'{spans}<span style="color:{SPECIAL_BORDER};margin:0 4px">&#9654;</span>')


def tokens_html(pieces: Sequence[TokenPiece], mask: Sequence[int], roles: Sequence[str] | None = None,
                *, truncated_at: int | None = None, full_length: int | None = None, virtual: int = 0,
                virtual_method: str = "", virtual_label: str = "") -> str:
    """Each token as a span: green when trained, grey when masked, outlined when special.

    Hovering a token shows its id, position and role. A scissors marker shows where
    truncation cut the example. ``virtual``: a prompt method's virtual tokens, drawn in front
    (``virtual_html``).
    """
    spans = [virtual_html(virtual, virtual_method, virtual_label)] if virtual else []
    for i, (p, m) in enumerate(zip(pieces, mask)):
        role = roles[i] if roles else ""
        style = [f"background:{TRAINED_BG if m else MASKED_BG}", "border-radius:2px", "margin:0 1px 1px 0"]
        if p.special:
            style.append(f"border:1px solid {SPECIAL_BORDER}")
            style.append(f"color:{SPECIAL_BORDER}")
        title = f"#{i} id {p.id}{' ' + role if role else ''}{' trained' if m else ' masked'}"
        text = _visible(p.text) if p.text else "&#8203;"
        spans.append(f'<span class="sftkit-tok" data-trained="{int(bool(m))}" title="{title}" '
                     f'style="{";".join(style)}">{text}</span>')
    if truncated_at is not None:
        lost = (full_length or truncated_at) - truncated_at
        spans.append(f'<span class="sftkit-cut" style="color:#b91c1c;font-weight:bold"> &#9986; cut at '
                     f'{truncated_at} tokens ({lost} more not trained)</span>')
    body = "".join(spans)
    return (f'<div style="font-family:monospace;font-size:12px;line-height:1.7;white-space:normal">'
            f'{body}</div>')


def messages_html(items: Sequence[str], kind: str = "warning") -> str:
    if not items:
        return ""
    colour = {"warning": "#92400e", "error": "#b91c1c", "info": "#1f2937"}[kind]
    icon = {"warning": "&#9888;", "error": "&#10006;", "info": "&#8505;"}[kind]
    rows = "".join(f'<li class="sftkit-{kind}" style="color:{colour}">{icon} {html.escape(t)}</li>'
                   for t in items)
    return f'<ul style="margin:4px 0;padding-left:18px">{rows}</ul>'


def stats_html(n_tokens: int, n_trained: int, max_length: int, prompt_length: int, *, virtual: int = 0,
               virtual_method: str = "") -> str:
    extra = legend = ""
    if virtual:
        where = "in front" if virtual_method in VIRTUAL_INPUT else "in every block's attention"
        extra = f" + <b>{virtual}</b> virtual {where}"
        bg = VIRTUAL_BG if virtual_method in VIRTUAL_INPUT else VIRTUAL_INSIDE_BG
        legend = (f' <span style="background:{bg};border:1px dashed {SPECIAL_BORDER};padding:0 4px">virtual token '
                  "(trained embedding, not a label)</span>")
    return (f'<b>{n_tokens}</b> tokens (max {max_length}){extra} &middot; <b>{n_trained}</b> trained &middot; '
            f'{prompt_length} in the prompt &middot; {LEGEND}{legend}')


def answer_html(model_text: str, expected: str, *, running: bool, note: str = "",
                matches: bool | None = None) -> str:
    """The model's answer beside the dataset's, with progress or the run's note and whether they match."""
    state = "&#8987; generating..." if running else html.escape(note)
    if matches is not None:
        state += (' <span style="color:#15803d">matches the dataset answer</span>' if matches else
                  ' <span style="color:#b45309">differs from the dataset answer</span>')
    return (f'<div style="font-family:monospace;white-space:pre-wrap;border-left:3px solid #1d4ed8;'
            f'padding-left:6px"><b>Model:</b> {html.escape(model_text)}</div>'
            f'<div style="font-family:monospace;color:#6b7280"><b>Dataset:</b> {html.escape(expected)}</div>'
            f'<div style="color:#6b7280">{state}</div>')


def error_html(exc: Exception, what: str) -> str:
    from ..core.errors import SftkitError

    text = str(exc) if isinstance(exc, SftkitError) else f"{type(exc).__name__}: {exc}"
    return f"<span style='color:#b91c1c'><b>{html.escape(what)}:</b> {html.escape(text)}</span>"
