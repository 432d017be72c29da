"""LayerPicker: the model as a grid of blocks x modules; click to choose what trains.

A thin view over ``sftkit.engine.anatomy`` and ``sftkit.engine.freeze.FreezePlan``.
"""

from __future__ import annotations

import html

import ipywidgets as W

from ..engine.anatomy import Anatomy, inspect_model
from ..engine.freeze import PRESETS, FreezePlan, PlanError

COLOURS = {"off": "#e5e7eb", "lora": "#86efac", "full": "#fdba74"}
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
</ul></details>
"""


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _weights_format(anatomy: Anatomy, model) -> str:
    if any(li.quantized for li in anatomy.linear.values()):
        return "4bit" if any(getattr(q, "quant_state", None) is not None
                             for q in model.parameters()) else "8bit"
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


class LayerPicker:
    """Choose what trains, block by block, and see the cost.

    model: the loaded model (full, 4-bit or peft-wrapped).
    plan: the starting FreezePlan (default: LoRA on attention, rank 16).
    device_bytes: the memory to compare the estimate with (default: free GPU memory, else RAM).
    """

    def __init__(self, model, plan: FreezePlan | None = None, *, device_bytes: int | None = None,
                 batch_size: int = 8, seq_len: int = 256):
        self.model = model
        self.anatomy = inspect_model(model)
        a = self.anatomy
        self.weights_format = _weights_format(a, model)
        if device_bytes is None:
            from ..engine.hardware import probe_hardware

            facts = probe_hardware()
            device_bytes = facts.cuda_free_bytes if facts.cuda_available else facts.ram_total_bytes
            self.device_name = facts.cuda_name if facts.cuda_available else "RAM"
        else:
            self.device_name = "device"
        self.device_bytes = device_bytes
        self._plan = plan or FreezePlan.preset("lora_attention", a)
        self.error: str | None = None
        self.estimate = None

        self.preset = W.Dropdown(options=list(PRESETS), value="lora_attention", description="Preset")
        self.top_n = W.BoundedIntText(value=a.n_blocks, min=1, max=a.n_blocks, description="Top N blocks",
                                      style={"description_width": "initial"}, layout=W.Layout(width="180px"))
        self.apply_preset_button = W.Button(description="Apply preset", icon="magic", layout=W.Layout(width="auto"))
        self.click_sets = W.ToggleButtons(options=[("LoRA", "lora"), ("Full", "full")], value="lora",
                                          description="Click sets", tooltips=["add a LoRA adapter", "train the weights"])
        self.rank = W.BoundedIntText(value=self._plan.rank, min=1, max=1024, description="Rank r",
                                     layout=W.Layout(width="160px"))
        self.alpha = W.BoundedFloatText(value=self._plan.alpha, min=0.001, max=4096, description="Alpha",
                                        layout=W.Layout(width="160px"))
        self.dropout = W.BoundedFloatText(value=self._plan.dropout, min=0, max=0.99, step=0.01, description="Dropout",
                                          layout=W.Layout(width="160px"))
        self.embeddings = W.ToggleButton(description="Embeddings", tooltip="train the input token vectors")
        self.head = W.ToggleButton(description="Head" + (" (tied)" if a.tied else ""),
                                   tooltip="train the output layer" + (" (the same matrix as the embeddings)"
                                                                      if a.tied else ""))
        self.biases = W.ToggleButton(description="All biases", disabled=not any(p.is_bias for p in a.params.values()),
                                     tooltip="train every bias (part of BitFit)")
        self.batch_size = W.BoundedIntText(value=batch_size, min=1, max=4096, description="Batch",
                                           layout=W.Layout(width="150px"))
        self.seq_len = W.BoundedIntText(value=seq_len, min=8, max=131072, description="Seq len",
                                        layout=W.Layout(width="170px"))
        self.checkpointing = W.Checkbox(value=False, description="Gradient checkpointing", indent=False)
        self.counters = W.HTML()
        self.messages = W.HTML()

        self.cells: dict[tuple[int, str], W.Button] = {}
        columns = a.linear_columns + a.norm_columns
        header = [W.Label("block", layout=W.Layout(width="48px"))] + [
            W.HTML(f'<div style="width:86px;font-size:11px;text-align:center" title="{html.escape(c)} '
                   f'({a.column_kind(c)})">{html.escape(c.split(".")[-1])}<br>'
                   f'<span style="color:#6b7280">{a.column_kind(c)}</span></div>') for c in columns]
        no_shrink = dict(flex="0 0 auto", min_height="26px")  # rows keep their height in the scroll box
        rows = [W.HBox(header, layout=W.Layout(flex="0 0 auto"))]
        for b in range(a.n_blocks):
            row = [W.Label(str(b), layout=W.Layout(width="48px"))]
            for c in columns:
                btn = W.Button(layout=W.Layout(width="86px", height="24px", margin="1px"))
                btn.on_click(lambda _, b=b, c=c: self.toggle(b, c))
                self.cells[(b, c)] = btn
                row.append(btn)
            rows.append(W.HBox(row, layout=W.Layout(**no_shrink)))
        self.grid = W.VBox(rows, layout=W.Layout(max_height="420px", overflow_y="auto"))

        self.apply_preset_button.on_click(lambda _: self.apply_preset())
        for w in (self.rank, self.alpha, self.dropout):
            w.observe(lambda _: self._settings_changed(), names="value")
        self.embeddings.observe(lambda ch: self._toggle_group(FreezePlan.embeddings(a), ch["new"]), names="value")
        self.head.observe(lambda ch: self._toggle_group(FreezePlan.head(a), ch["new"]), names="value")
        self.biases.observe(lambda ch: self._toggle_group(self._bias_plan(), ch["new"]), names="value")
        for w in (self.batch_size, self.seq_len, self.checkpointing):
            w.observe(lambda _: self.refresh(), names="value")

        self.widget = W.VBox([
            W.HTML(f"<b>Layer picker</b>: {html.escape(a.describe())}"),
            W.HBox([self.preset, self.top_n, self.apply_preset_button]),
            W.HBox([self.click_sets, self.rank, self.alpha, self.dropout]),
            W.HBox([self.embeddings, self.head, self.biases]),
            W.HTML(f'<span style="background:{COLOURS["lora"]};padding:0 4px">LoRA</span> '
                   f'<span style="background:{COLOURS["full"]};padding:0 4px">full</span> '
                   f'<span style="background:{COLOURS["off"]};padding:0 4px">frozen</span> '
                   "&middot; cell label: L = LoRA, F = full, then the module's parameter count"),
            self.grid,
            W.HBox([self.batch_size, self.seq_len, self.checkpointing]),
            self.counters, self.messages, W.HTML(HELP),
        ])
        self.refresh()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- the plan -------------------------------------------------------------------
    @property
    def plan(self) -> FreezePlan:
        """The current FreezePlan: what the run launcher uses."""
        return self._plan

    def set_plan(self, plan: FreezePlan) -> None:
        self._plan = plan
        self.refresh()

    def apply_preset(self, name: str | None = None, top_n: int | None = None) -> None:
        name = name or self.preset.value
        top = top_n if top_n is not None else self.top_n.value
        top = None if (top == self.anatomy.n_blocks and name not in ("lora_top_blocks", "freeze_tuning")) else top
        try:
            plan = FreezePlan.preset(name, self.anatomy, top_n=top, embeddings=self.embeddings.value,
                                     head=self.head.value, rank=int(self.rank.value), alpha=float(self.alpha.value),
                                     dropout=float(self.dropout.value))
        except PlanError as exc:
            self._show_error(str(exc))
            return
        self.preset.value = name
        self._plan = plan
        self.refresh()

    def cell_state(self, block: int, column: str) -> str:
        a = self.anatomy
        module = a.module_name(block, column)
        if module in self._plan.lora_modules:
            return "lora"
        names = [n for n in a.params_of_module(module) if not a.params[n].is_bias] or a.params_of_module(module)
        if names and all(n in self._plan.train_params for n in names):
            return "full"
        return "off"

    def toggle(self, block: int, column: str) -> None:
        """What a click on a cell does: set it to the "Click sets" state, or back to frozen."""
        a = self.anatomy
        module = a.module_name(block, column)
        want = self.click_sets.value if (block, column) in a.linear else "full"
        state = self.cell_state(block, column)
        lora = set(self._plan.lora_modules) - {module}
        params = set(self._plan.train_params) - set(a.params_of_module(module))
        if state != want:
            if want == "lora":
                lora.add(module)
            else:
                params |= set(a.params_of_module(module))
        self._plan = self._plan.with_settings(lora_modules=frozenset(lora), train_params=frozenset(params),
                                              label="custom")
        self.refresh()

    def _toggle_group(self, group: FreezePlan, on: bool) -> None:
        self._plan = (self._plan | group) if on else (self._plan - group)
        self.refresh()

    def _bias_plan(self) -> FreezePlan:
        return FreezePlan(train_params=frozenset(p.name for p in self.anatomy.params.values() if p.is_bias))

    def _settings_changed(self) -> None:
        try:
            self._plan = self._plan.with_settings(rank=int(self.rank.value), alpha=float(self.alpha.value),
                                                  dropout=float(self.dropout.value))
        except PlanError as exc:
            self._show_error(str(exc))
            return
        self.refresh()

    # ---- rendering --------------------------------------------------------------------
    def _show_error(self, message: str) -> None:
        self.error = message
        self.messages.value = f'<div class="sftkit-error" style="color:#b91c1c">&#10006; {html.escape(message)}</div>'

    def refresh(self) -> None:
        a = self.anatomy
        for (b, c), btn in self.cells.items():
            state = self.cell_state(b, c)
            module = a.module_name(b, c)
            n = a.linear[(b, c)].n_params if (b, c) in a.linear else sum(
                a.params[p].numel for p in a.params_of_module(module))
            btn.description = f"{'L ' if state == 'lora' else 'F ' if state == 'full' else ''}{_short(n)}"
            btn.style.button_color = COLOURS[state]
            btn.tooltip = f"{module}: {n:,} parameters, {state}"
        try:
            trainable = self._plan.trainable_params(a)
            est = self._plan.memory_estimate(a, batch_size=int(self.batch_size.value), seq_len=int(self.seq_len.value),
                                             weights=self.weights_format,
                                             gradient_checkpointing=bool(self.checkpointing.value))
        except PlanError as exc:
            self.estimate = None
            self.counters.value = ""
            self._show_error(str(exc))
            return
        self.error = None
        self.estimate = est
        self.trainable = trainable
        pct = 100 * trainable / a.total_params
        fits = self.device_bytes is None or est.total <= 0.9 * self.device_bytes
        rows = "".join(f"<tr><td>{k}</td><td style='text-align:right'>{v / 2**20:,.0f} MiB</td></tr>"
                       for k, v in est.rows())
        device = (f"{self.device_name}: {_size(self.device_bytes)}"
                  if self.device_bytes else "device memory unknown")
        self.counters.value = (
            f'<div class="sftkit-counters"><b>{trainable:,}</b> trainable parameters '
            f'(<b>{pct:.3f}%</b> of {a.total_params:,}) &middot; {self._plan.method.upper()} &middot; '
            f'weights {self.weights_format} &middot; plan: {html.escape(self._plan.label)}'
            f'<table style="font-size:12px">{rows}</table>estimated peak for batch {self.batch_size.value} x '
            f'{self.seq_len.value} tokens, against {device}</div>')
        if not fits:
            self.messages.value = (
                f'<div class="sftkit-warning" style="color:#92400e">&#9888; The estimate ({_size(est.total)}) '
                f"won't fit in {device}: lower the batch size or sequence length, turn on gradient "
                f"checkpointing, train fewer blocks, or load the model in 4-bit.</div>")
        else:
            self.messages.value = ""
