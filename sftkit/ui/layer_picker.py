"""LayerPicker: the model as a grid of blocks x modules; click to choose what trains.

Wiring only: the controls are bound to a ``sftkit.state.plan_editor.PlanEditor`` (the plan, the
toggles, the counters, the estimate and whether it fits) and redraw when it changes.
"""

from __future__ import annotations

import html

import ipywidgets as W

from ..core.plan import PRESETS
from ..core.runconfig import knob_spec
from ..engine.freeze import FreezePlan
from ..state.plan_editor import GROUPS, PLAN, PlanEditor
from .help import add_tips
from .render import error_html

COLOURS = {"off": "#e5e7eb", "lora": "#86efac", "full": "#fdba74", "ia3": "#93c5fd", "prompt": "#c4b5fd"}
MARKS = {"lora": "L ", "full": "F ", "ia3": "I ", "prompt": "P ", "off": ""}
HELP = """
<details><summary><b>What do these choices mean?</b></summary>
<ul style="margin:4px 0">
<li><b>LoRA</b> (green): the module's weights stay frozen; two small matrices of rank <i>r</i> learn a
correction next to it. Few parameters, little memory, and the base model is untouched.</li>
<li><b>Full</b> (orange): every weight of that module is trained. Most expressive, but each trained
parameter also needs a gradient and two optimizer values (AdamW), about 4x its memory.</li>
<li><b>Rank r</b>: the size of the LoRA matrices. 8-16 is typical; higher learns more and costs more.
<b>Alpha</b> scales the correction (often r or 2r). <b>Dropout</b> regularises the adapters.</li>
<li><b>Attention</b> projections (q, k, v, o) decide what each token looks at; <b>MLP</b> projections store
most of the model's knowledge. LoRA on attention only is the classic choice; all linear layers learns more.</li>
<li><b>Top N blocks</b>: train only the last blocks. Backward then stops there, which saves activation
memory and time. <b>Freeze tuning</b> trains those blocks fully. <b>BitFit</b> trains only norms and biases.</li>
<li><b>Embeddings / head</b>: train the token vectors / the output layer; needed for new tokens, large.</li>
<li><b>IA3</b> (blue): learned vectors scale a module's outputs (the keys, values and the MLP's down-projection
inputs): the smallest adapter, and it merges into the weights. <b>DoRA</b> splits each LoRA-adapted weight into
a direction and a learned magnitude; <b>rsLoRA</b> scales the update by alpha/sqrt(r), which keeps high ranks stable.</li>
<li><b>Prompt tuning</b>: no module changes; a few trained <i>virtual tokens</i> go in front of every prompt (a
soft prompt). <b>Prefix tuning</b> puts trained keys/values in front of every block's attention; <b>p-tuning</b>
makes the soft prompt with a small MLP; <b>LLaMA-Adapter</b> (violet) adds gated prompt vectors to the attention
of the top blocks. They train thousands of numbers instead of millions, and can't be merged into the weights.</li>
</ul></details>
"""


def _percent(p: float) -> str:
    """0.0086 -> '0.009%', 1.37 -> '1.37%': small shares keep a significant digit."""
    return f"{p:.3f}%" if p < 1 else f"{p:.2f}%"


def _tokens_html(n: int, words: str) -> str:
    """The virtual tokens as boxes in front of the prompt (the first 24 drawn), and where they go."""
    boxes = "".join(f'<span class="sftkit-virtual-token" style="background:{COLOURS["prompt"]};padding:0 3px;'
                    f'margin-right:1px;font-size:11px">v{i + 1}</span>' for i in range(min(n, 24)))
    more = f" &hellip; +{n - 24}" if n > 24 else ""
    return (f'<div>{boxes}{more} <span style="background:#f3f4f6;padding:0 4px">your prompt &hellip;</span>'
            f'<div style="font-size:12px;color:#4b5563">{html.escape(words)}</div></div>')


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


class LayerPicker:
    """Choose what trains, block by block, and see the cost.

    model: the loaded model (full, 4-bit or peft-wrapped).
    plan: the starting FreezePlan (default: LoRA on attention, rank 16).
    device_bytes: the memory to compare the estimate with (default: free GPU memory, else RAM).
    """

    def __init__(self, model, plan: FreezePlan | None = None, *, device_bytes: int | None = None,
                 batch_size: int = 8, seq_len: int = 256):
        self.model = model
        self.editor = ed = PlanEditor.for_model(model, plan, device_bytes=device_bytes, batch_size=batch_size,
                                                seq_len=seq_len)
        a, small = ed.anatomy, dict(layout=W.Layout(width="160px"))
        self.preset = W.Dropdown(options=list(PRESETS), description="Preset")
        self.top_n = W.BoundedIntText(min=1, max=a.n_blocks, description="Top N blocks",
                                      style={"description_width": "initial"}, layout=W.Layout(width="180px"))
        self.apply_preset_button = W.Button(description="Apply preset", icon="magic", layout=W.Layout(width="auto"))
        self.click_sets = W.ToggleButtons(options=[("LoRA", "lora"), ("Full", "full")], description="Click sets",
                                          tooltips=["add a LoRA adapter", "train the weights"])
        self.rank = W.BoundedIntText(min=1, max=1024, description="Rank r", **small)
        self.alpha = W.BoundedFloatText(min=0.001, max=4096, description="Alpha", **small)
        self.dropout = W.BoundedFloatText(min=0, max=0.99, step=0.01, description="Dropout", **small)
        vt = knob_spec("adapter.virtual_tokens")  # the range from the config's one declaration
        self.virtual_tokens = W.BoundedIntText(min=vt.min, max=vt.max, description="Virtual tokens",
                                               style={"description_width": "initial"}, layout=W.Layout(width="170px"),
                                               tooltip=vt.help)
        self.use_dora = W.Checkbox(description="DoRA", indent=False, layout=W.Layout(width="70px"))
        self.rslora = W.Checkbox(description="rsLoRA", indent=False, layout=W.Layout(width="80px"))
        self.tokens = W.HTML()
        self.embeddings = W.ToggleButton(description="Embeddings", tooltip="train the input token vectors")
        self.head = W.ToggleButton(description="Head" + (" (tied)" if a.tied else ""), tooltip="train the output layer"
                                   + (" (the same matrix as the embeddings)" if a.tied else ""))
        self.biases = W.ToggleButton(description="All biases", disabled=not any(p.is_bias for p in a.params.values()),
                                     tooltip="train every bias (part of BitFit)")
        self.batch_size = W.BoundedIntText(min=1, max=4096, description="Batch", layout=W.Layout(width="150px"))
        self.seq_len = W.BoundedIntText(min=8, max=131072, description="Seq len", layout=W.Layout(width="170px"))
        self.checkpointing = W.Checkbox(description="Gradient checkpointing", indent=False)
        self.counters, self.messages = W.HTML(), W.HTML()
        self._syncing = False
        self._sync_controls()
        self.grid = self._build_grid()

        # each control sets one piece of the editor's state; the editor's changes redraw (_redraw)
        setters = {
            "preset": lambda v: ed.select(preset=v), "top_n": lambda v: ed.select(top_n=v),
            "click_sets": lambda v: ed.select(click_sets=v), "rank": lambda v: ed.set_settings(rank=int(v)),
            "alpha": lambda v: ed.set_settings(alpha=float(v)), "dropout": lambda v: ed.set_settings(dropout=float(v)),
            "virtual_tokens": lambda v: ed.set_settings(virtual_tokens=int(v)),
            "use_dora": lambda v: ed.set_settings(use_dora=bool(v)), "rslora": lambda v: ed.set_settings(rslora=bool(v)),
            "batch_size": lambda v: ed.set_budget(batch_size=v), "seq_len": lambda v: ed.set_budget(seq_len=v),
            "checkpointing": lambda v: ed.set_budget(gradient_checkpointing=v),
            **{g: (lambda v, g=g: ed.set_group(g, v)) for g in GROUPS}}
        for name, setter in setters.items():
            getattr(self, name).observe(lambda ch, f=setter: None if self._syncing else self._guard(f, ch["new"]),
                                        names="value")
        add_tips(self)
        self.apply_preset_button.on_click(lambda _: self._guard(self.apply_preset))
        ed.on_change(self._redraw)

        self.widget = W.VBox([
            W.HTML(f"<b>Layer picker</b>: {html.escape(a.describe())}"),
            W.HBox([self.preset, self.top_n, self.apply_preset_button]),
            W.HBox([self.click_sets, self.rank, self.alpha, self.dropout, self.use_dora, self.rslora]),
            W.HBox([self.virtual_tokens, self.tokens]),
            W.HBox([self.embeddings, self.head, self.biases]),
            W.HTML(" ".join(f'<span style="background:{COLOURS[k]};padding:0 4px">{name}</span>' for k, name in
                            (("lora", "LoRA"), ("ia3", "IA3"), ("full", "full"), ("prompt", "LLaMA-Adapter"),
                             ("off", "frozen")))
                   + " &middot; cell label: L = LoRA, I = IA3, F = full, P = adapted attention, then the module's "
                   "parameter count"),
            self.grid,
            W.HBox([self.batch_size, self.seq_len, self.checkpointing]),
            self.counters, self.messages, W.HTML(HELP),
        ])
        self.refresh()

    def _build_grid(self) -> W.VBox:
        a = self.anatomy
        header = [W.Label("block", layout=W.Layout(width="48px"))] + [
            W.HTML(f'<div style="width:86px;font-size:11px;text-align:center" title="{html.escape(c)} '
                   f'({a.column_kind(c)})">{html.escape(c.split(".")[-1])}<br>'
                   f'<span style="color:#6b7280">{a.column_kind(c)}</span></div>') for c in self.editor.columns]
        rows = [W.HBox(header, layout=W.Layout(flex="0 0 auto"))]
        self.cells: dict[tuple[int, str], W.Button] = {}
        for b in range(a.n_blocks):
            row = [W.Label(str(b), layout=W.Layout(width="48px"))]
            for c in self.editor.columns:
                self.cells[(b, c)] = btn = W.Button(layout=W.Layout(width="86px", height="24px", margin="1px"))
                btn.on_click(lambda _, b=b, c=c: self._guard(self.toggle, b, c))
                row.append(btn)
            rows.append(W.HBox(row, layout=W.Layout(flex="0 0 auto", min_height="26px")))  # rows keep their height
        return W.VBox(rows, layout=W.Layout(max_height="420px", overflow_y="auto"))

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- the editor's state, as the picker's ------------------------------------------------
    plan = property(lambda self: self.editor.plan, doc="The current FreezePlan: what the run launcher uses.")
    anatomy = property(lambda self: self.editor.anatomy)
    error = property(lambda self: self.editor.error)
    estimate = property(lambda self: self.editor.estimate)
    trainable = property(lambda self: self.editor.trainable)
    weights_format = property(lambda self: self.editor.weights)
    device_bytes = property(lambda self: self.editor.device_bytes)
    device_name = property(lambda self: self.editor.device_name)

    def set_plan(self, plan: FreezePlan) -> None:
        self.editor.set_plan(plan)

    def apply_preset(self, name: str | None = None, top_n: int | None = None) -> None:
        self.editor.apply_preset(name, top_n)

    def cell_state(self, block: int, column: str) -> str:
        return self.editor.cell_state(block, column)

    def toggle(self, block: int, column: str) -> None:
        """What a click on a cell does: set it to the "Click sets" state, or back to frozen."""
        self.editor.toggle(block, column)

    # ---- drawing ---------------------------------------------------------------------------
    def refresh(self) -> None:
        self._redraw(PLAN)

    def _guard(self, action, *args):
        """Every error of a control is shown in the messages area, never lost in the browser's log."""
        try:
            return action(*args)
        except Exception as exc:  # noqa: BLE001
            self.messages.value = error_html(exc, "Not applied")
            return None

    def _sync_controls(self) -> None:
        ed = self.editor
        values = {self.preset: ed.preset, self.top_n: ed.top_n, self.click_sets: ed.click_sets,
                  self.rank: ed.plan.rank, self.alpha: ed.plan.alpha, self.dropout: ed.plan.dropout,
                  self.virtual_tokens: ed.plan.virtual_tokens, self.use_dora: ed.plan.use_dora,
                  self.rslora: ed.plan.rslora,
                  self.batch_size: ed.batch_size, self.seq_len: ed.seq_len,
                  self.checkpointing: ed.gradient_checkpointing}
        values.update({getattr(self, g): ed.groups[g] for g in GROUPS})
        self._syncing = True  # showing the editor's values must not write them back (a box may clamp)
        try:
            for widget, value in values.items():
                if widget.value != value:
                    if hasattr(widget, "max") and isinstance(value, (int, float)) and not isinstance(value, bool):
                        widget.max, widget.min = max(widget.max, value), min(widget.min, value)
                    widget.value = value
        finally:
            self._syncing = False

    def _redraw(self, event: str) -> None:
        ed, a = self.editor, self.anatomy
        self._sync_controls()
        if event == PLAN:
            for (b, c), btn in self.cells.items():
                state, n = ed.cell_state(b, c), ed.cell_params(b, c)
                btn.description = f"{MARKS[state]}{_short(n)}"
                btn.style.button_color = COLOURS[state]
                btn.tooltip = f"{a.module_name(b, c)}: {n:,} parameters, {state}"
        error, est = ed.error, ed.estimate
        words = ed.virtual_tokens_text()
        self.tokens.value = "" if words is None else _tokens_html(ed.plan.virtual_tokens, words)
        frozen = f" (frozen ones in {html.escape(ed.frozen)} when an adapter trains)" if ed.frozen else ""
        self.counters.value = "" if est is None else (
            f'<div class="sftkit-counters"><b>{ed.trainable:,}</b> trainable parameters: '
            f'<b>{_percent(ed.trainable_percent)}</b> of the model ({ed.total_params:,}) trains &middot; '
            f'{html.escape(ed.plan.kind_label)} '
            f'&middot; weights {ed.weights}{frozen} &middot; plan: {html.escape(ed.plan.label)}<table style="font-size:12px">'
            + "".join(f"<tr><td>{k}</td><td style='text-align:right'>{v / 2**20:,.0f} MiB</td></tr>"
                      for k, v in est.rows())
            + f"</table>estimated peak for batch {ed.batch_size} x {ed.seq_len} tokens"
            + (f" (run in passes of at most {ed.pass_tokens} tokens)" if ed.pass_tokens else "")
            + f", against {ed.device_text}</div>")
        kind, colour, mark, text = ("error", "#b91c1c", "&#10006;", error) if error else \
            ("warning", "#92400e", "&#9888;", ed.warning)
        self.messages.value = "" if text is None else \
            f'<div class="sftkit-{kind}" style="color:{colour}">{mark} {html.escape(text, quote=False)}</div>'
