"""AttentionView on a 512-token prompt with every layer captured: bytes sent to the browser
and Python-side time per slice change (grid click, head change, window move). Target: at
most 1 MB and 1 s. Writes the "Attention view" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/attention_payload.py
"""

import json
import statistics
import time

import plotly.io as pio
from prompting_baseline import HERE, write_section

import sftkit
from sftkit.engine.attention import capture_attention
from sftkit.ui import AttentionView


def payload_bytes(figs) -> int:
    """JSON bytes of what a slice change sends: the traces it updates."""
    return sum(len(pio.to_json(f.data[0].to_plotly_json())) for f in figs)


def main():
    model, tok = sftkit.load_model("default")
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(80))
    ids = tok(text, add_special_tokens=False)["input_ids"][:512]
    t = time.perf_counter()
    cap = capture_attention(model, tok, input_ids=ids)
    capture_s = time.perf_counter() - t
    t = time.perf_counter()
    view = AttentionView(cap)
    build_s = time.perf_counter() - t
    full_json = len(json.dumps(cap.probs[0].astype("float32").round(6).tolist()))  # one layer, all heads, plain JSON
    actions = {
        "grid click (layer, head)": lambda i: view.cells[(i % 30, i % 9)].click(),
        "head change (incl. mean/max)": lambda i: setattr(view.head, "value", ["mean", "max", i % 9][i % 3]),
        "window move": lambda i: setattr(view.window_start, "value", (i * 37) % (view.window_start.max + 1)),
        "row change": lambda i: setattr(view.query, "value", (i * 53) % 512),
    }
    lines = []
    for name, act in actions.items():
        times, sizes = [], []
        sent = (view.row_plot,) if name == "row change" else (view.heatmap, view.row_plot)
        for i in range(12):
            t = time.perf_counter()
            act(i + 1)
            times.append(time.perf_counter() - t)
            sizes.append(payload_bytes(sent))
        lines.append(f"| {name} | {max(sizes) / 1e3:,.0f} kB | {statistics.median(times) * 1e3:,.0f} ms | "
                     f"{max(times) * 1e3:,.0f} ms |")
        print(lines[-1], flush=True)
    table = ("| slice change | bytes sent (max) | Python time (median) | (max) |\n|---|---|---|---|\n"
             + "\n".join(lines))
    section = (
        f"## Attention view (default model, 512-token prompt, all 30 layers x 9 heads)\n\n"
        f"`python benchmarks/attention_payload.py`, {time.strftime('%Y-%m-%d')}. Capture {capture_s:.1f} s "
        f"(float16, {cap.probs.nbytes / 2**20:.0f} MiB kept in the kernel); view built in {build_s:.1f} s. "
        f"For comparison, one layer's heads as plain JSON would be {full_json / 1e6:.0f} MB. "
        f"The view sends at most a 256 x 256 float32 window plus one row; a row change sends the row only.\n\n" + table + "\n")
    write_section(HERE / "RESULTS.md", "## Attention view", section)


if __name__ == "__main__":
    main()
