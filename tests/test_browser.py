"""JupyterLab from lab/start.sh in a real headless Chromium: the start notebook opens in the
project's kernel (no "Select Kernel" dialog), runs a cell, and shows its output.

The lab runs from a temporary copy of lab/ and notebooks/ (see test_lab), so the notebooks' run
folders, templates and exports land there, and its kernels use a private sftkit cache.

Without Chromium or playwright the browser tests skip, saying which is missing; under CI (CI set
and not "false"/"0") they fail instead, so a CI run can't pass without having run them.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import keep_screenshot, linked_cache, missing_piece, project_copy, running_lab, wait_for

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


def missing_browser() -> str | None:
    """Why the browser tests can't run here, or None."""
    if CHROMIUM is None:
        return ("Debian chromium not installed: `bash .ci/browser-deps.sh` installs it where it can "
                "(apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"playwright is not importable ({exc}): pip install -e '.[test]'"
    return None


@pytest.fixture(scope="session")
def browser_ready():  # session scope: checked before the (session) default model fixture
    why = missing_browser()
    if why is None:
        return
    missing_piece(why, ci_message=f"the browser tests must run, but {why}")


@pytest.fixture(scope="module")
def lab(browser_ready, tmp_path_factory, default_model_folder):
    """JupyterLab on a project copy; its kernels use a private cache linking the default model."""
    work = tmp_path_factory.mktemp("browser-lab")
    cache = linked_cache(work / "cache", default_model_folder)
    # the comparison notebook compares on 8 items (its fast profile); the training notebook keeps its steps
    with running_lab(project_copy(work / "project"), cache, SFTKIT_NOTEBOOK_ITEMS="8") as info:
        yield info


FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture()
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def open_alone(page, lab, notebook: str, workspace: str):
    """Open ``notebook`` in a fresh workspace (so every indicator is its own) and wait for its kernel."""
    page.goto(f"{lab['base']}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={lab['token']}", timeout=60_000)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".jp-Toolbar-kernelName", has_text="sftkit (Python 3)").first.wait_for(timeout=60_000)
    panel.locator(".jp-Cell").first.wait_for(timeout=60_000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=60_000)
    return panel


def widget_output(panel, page, inside: str):
    """The output area of the open notebook that holds ``inside`` (a CSS selector): one widget, scrolled into view."""
    out = panel.locator(".jp-OutputArea-output").filter(has=page.locator(inside)).first
    out.scroll_into_view_if_needed()
    return out


def run_all(page):
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


ALL_CELLS_RAN = """() => {
    const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
    if (!panel) return false;
    const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim());
    return prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t));
}"""


def wait_for_all_cells(page, timeout: int = 600_000):
    """Until every code cell of the open notebook has run ([n]: prompts, none queued [*]):
    a widget's events reach the kernel only once it is free."""
    page.wait_for_function(ALL_CELLS_RAN, timeout=timeout)


def test_start_notebook_opens_in_the_sftkit_kernel_and_runs(lab, page, tmp_path):
    page.goto(f"{lab['base']}/lab?token={lab['token']}", timeout=60_000)
    # The workspace opens the start notebook.
    tab = page.locator(".lm-TabBar-tab", has_text="00_start_here.ipynb")
    tab.first.wait_for(timeout=60_000)
    # Kernel name in the notebook toolbar, and no kernel-picker dialog.
    page.locator(".jp-Toolbar-kernelName", has_text="sftkit (Python 3)").first.wait_for(timeout=60_000)
    assert page.locator(".jp-Dialog", has_text="Select Kernel").count() == 0
    # Idle kernel, then run the plan cell (the 5th cell: print(sftkit.plan_load().describe())).
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=60_000)
    cells = page.locator(".jp-Notebook .jp-Cell")
    cells.nth(2).click()  # `import sftkit ...`
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("Shift+Enter")  # markdown
    page.keyboard.press("Shift+Enter")  # the plan cell
    page.locator(".jp-OutputArea-output", has_text="4-bit off because").first.wait_for(timeout=90_000) \
        if not _cuda() else page.locator(".jp-OutputArea-output", has_text="CUDA GPU found").first.wait_for(timeout=90_000)
    page.screenshot(path=str(tmp_path / "lab.png"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_prompt_builder_renders_updates_as_you_type_and_answers(lab, page, tmp_path):
    panel = open_alone(page, lab, "01_prompt_builder.ipynb", "builder-test")
    run_all(page)
    try:
        panel.locator(".sftkit-tok").first.wait_for(timeout=120_000)
        wait_for_all_cells(page)
        assert panel.locator('.sftkit-tok[data-trained="1"]').count() == 11  # 2021-style date + <|im_end|>
        # Typing in the user pattern re-renders the preview through the kernel.
        box = panel.locator(".widget-textarea textarea").nth(1)
        box.fill("Please rewrite: {text}")
        page.locator(".sftkit-tok", has_text="rewrite").first.wait_for(timeout=30_000)
        # Try it: the base model's answer streams into the view.
        panel.locator("button", has_text="Try it").click()
        page.get_by_text("matches the dataset answer").or_(page.get_by_text("differs from the dataset answer")) \
            .first.wait_for(timeout=120_000)
    except Exception:
        page.screenshot(path="/tmp/sftkit-builder-failure.png", full_page=True)
        raise
    page.screenshot(path=str(tmp_path / "builder.png"), full_page=True)
    keep_screenshot(widget_output(panel, page, ".sftkit-tok"), "prompt_builder", tmp_path)


def test_layer_picker_renders_and_a_click_changes_the_count(lab, page, tmp_path):
    panel = open_alone(page, lab, "02_layer_picker.ipynb", "picker-test")
    run_all(page)
    counters = panel.locator(".sftkit-counters").first
    counters.wait_for(timeout=120_000)
    wait_for_all_cells(page)
    assert "1,843,200" in counters.inner_text()  # LoRA r=16 on attention of SmolLM2-135M
    # The grid: 30 block rows; click block 29's up_proj cell (frozen -> LoRA).
    cell = panel.locator("button[title^='model.layers.29.mlp.up_proj']").first
    cell.scroll_into_view_if_needed()
    cell.click()
    panel.locator(".sftkit-counters", has_text="1,876,992").first.wait_for(timeout=30_000)  # + 16 x (576+1536)
    page.screenshot(path=str(tmp_path / "picker.png"))
    keep_screenshot(widget_output(panel, page, ".sftkit-counters"), "layer_picker", tmp_path)


def test_attention_view_renders_heatmap_and_a_grid_click_opens_a_head(lab, page, tmp_path):
    panel = open_alone(page, lab, "03_attention.ipynb", "attention-test")
    # run the capture and view cells only
    panel.locator(".jp-Cell").nth(1).click()
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("Shift+Enter")
    plot = panel.locator(".js-plotly-plot").first
    plot.wait_for(timeout=120_000)
    panel.locator(".gtitle", has_text="layer 0, head 0").first.wait_for(timeout=60_000)
    cell = panel.locator("button[title^='layer 12, head 4:']").first
    cell.scroll_into_view_if_needed()
    cell.click()
    panel.locator(".gtitle", has_text="layer 12, head 4").first.wait_for(timeout=30_000)
    panel.locator(".js-plotly-plot .heatmaplayer image, .js-plotly-plot .hm").first.wait_for(
        state="attached", timeout=30_000)
    # the grid is readable: every cell's value fits its button (no "..." from an overflowing label); each
    # button view attaches on its own, so wait until all 30 x 9 are on the page before reading them
    buttons = panel.locator("button[title^='layer ']")
    for _ in range(240):
        if buttons.count() >= 30 * 9:
            break
        page.wait_for_timeout(250)
    clipped = panel.locator("button[title^='layer ']").evaluate_all(
        "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.title)")
    assert panel.locator("button[title^='layer ']").count() == 30 * 9 and not clipped, clipped[:5]
    page.screenshot(path=str(tmp_path / "attention.png"))
    keep_screenshot(widget_output(panel, page, ".js-plotly-plot"), "attention", tmp_path)


def test_run_launcher_start_grows_the_loss_curve_and_stop_ends_it(lab, page, tmp_path):
    panel = open_alone(page, lab, "04_training.ipynb", "training-test")
    panel.locator(".jp-Cell").nth(2).click()  # the cell that builds the launcher
    page.keyboard.press("Shift+Enter")
    start = panel.locator("button", has_text="Start").first
    start.wait_for(timeout=120_000)
    plot = panel.locator(".js-plotly-plot").first
    plot.wait_for(timeout=60_000)
    start.click()
    # the train-loss trace's steps, as the browser holds them
    steps = "el => (el.data && el.data[0] && el.data[0].x) ? Array.from(el.data[0].x) : []"
    try:
        # The curve grows: 3 logged steps in the figure, and drawn (a path through them).
        page.wait_for_function(f"el => ({steps})(el).length >= 3", arg=plot.element_handle(), timeout=300_000)
        line = panel.locator(".js-plotly-plot .scatterlayer .trace path.js-line").first
        line.wait_for(state="attached", timeout=30_000)
        assert re.match(r"^M[^L]*L", line.get_attribute("d") or ""), line.get_attribute("d")
        if os.environ.get("SFTKIT_SCREENSHOTS"):  # the README's picture: mid-run, with the first samples
            panel.locator(".widget-html", has_text="(target ").first.wait_for(timeout=300_000)
        keep_screenshot(widget_output(panel, page, ".js-plotly-plot"), "run_launcher", tmp_path)
        panel.locator("button", has_text="Stop").first.click()
        status = panel.locator(".widget-html", has_text="stopped at step").first
        status.wait_for(timeout=120_000)
        stopped_at = int(re.search(r"stopped at step (\d+)", status.inner_text()).group(1))
        assert stopped_at >= 3
        # After the stop the curve holds every step the run trained, and no more.
        page.wait_for_function(f"([el, n]) => ({steps})(el).length === n", arg=[plot.element_handle(), stopped_at],
                               timeout=60_000)
        assert plot.evaluate(steps) == list(range(1, stopped_at + 1))
    except Exception:
        page.screenshot(path="/tmp/sftkit-training-failure.png", full_page=True)
        raise
    page.screenshot(path=str(tmp_path / "training.png"), full_page=True)
    # The run folder went to the lab's copy of notebooks/, not the repository's.
    runs = [p for p in (lab["notebooks"] / "runs").iterdir() if p.is_dir()]
    assert runs and all((r / "config.yaml").is_file() for r in runs)


def test_compare_view_renders_the_summary_chart_and_the_per_item_table(lab, page, tmp_path, cache):
    # the notebook compares the latest finished dates run of its runs/ folder: a short one is trained here,
    # through the run engine, as notebook 4 would (the notebook's own "train one if none" path is the
    # nbclient test's)
    from sftkit.core.examples import example_config
    from sftkit.engine.train import run_training

    short = example_config().with_changes(store=str(lab["notebooks"] / "runs"), training={
        "max_steps": 6, "eval_every": 0, "sample_every": 0, "checkpoint_every": 6})
    assert run_training(short).state == "finished"
    panel = open_alone(page, lab, "05_prompt_vs_finetune.ipynb", "compare-test")
    run_all(page)
    try:
        table = panel.locator("table.sftkit-compare-items").first
        table.wait_for(timeout=420_000)
        wait_for_all_cells(page)
        assert table.locator("tr").count() == 1 + 8  # header + the 8 items, every variant side by side
        head = table.locator("tr").first.inner_text()
        assert all(name in head for name in ("zero-shot", "few-shot", "adapter"))
        pairs = panel.locator("table.sftkit-compare-pairs").first
        assert pairs.locator("tr").count() == 1 + 3 and "on 8 items" in pairs.inner_text()
        # the summary charts are drawn: one bar per variant in the headline chart, an error bar on each
        chart = panel.locator(".js-plotly-plot", has=page.locator(".gtitle", has_text="score (95% CI)")).first
        chart.wait_for(timeout=30_000)
        assert chart.locator(".barlayer .point").count() == 3
        assert chart.locator(".errorbar").count() == 3
        # the filter redraws the table through the kernel: A's losses (the adapter wrong, zero-shot right)
        panel.locator(".widget-dropdown select").first.select_option("losses")
        label = panel.locator(".widget-label", has_text=re.compile(r"^of \d+ \(\d+ items\)$")).first
        page.wait_for_function("el => !el.textContent.includes('(8 items)')", arg=label.element_handle(),
                               timeout=30_000)
        losses = int(re.search(r"\((\d+) items\)", label.inner_text()).group(1))
        assert 0 <= losses < 8
        live = panel.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-dropdown")).first
        if losses:
            assert live.locator("table.sftkit-compare-items tr").count() == 1 + losses
        else:
            live.get_by_text("no items to show with this filter").first.wait_for(timeout=10_000)
    except Exception:
        page.screenshot(path="/tmp/sftkit-compare-failure.png", full_page=True)
        raise
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
    panel.locator(".widget-dropdown select").first.select_option("all")
    panel.locator(".widget-label", has_text="(8 items)").first.wait_for(timeout=30_000)
    keep_screenshot(widget_output(panel, page, "table.sftkit-compare-items"), "compare", tmp_path)



def test_feedback_collector_rates_two_items_by_clicking(lab, page, tmp_path):
    import json

    panel = open_alone(page, lab, "06_feedback.ipynb", "feedback-test")
    panel.locator(".jp-Cell").nth(2).click()  # the SFT run (trained here if runs/ has none), then the collector
    for _ in range(3):
        page.keyboard.press("Shift+Enter")
    ratings = lab["notebooks"] / "runs" / "feedback" / "dates" / "ratings.jsonl"

    def n_ratings() -> int:
        return len(ratings.read_text().splitlines()) if ratings.exists() else 0

    before = n_ratings()  # a collector reopened on the lab's store continues after what is there
    try:
        for n, button in enumerate(("A better", "B better"), start=1):
            prompt = panel.locator(".sftkit-feedback-prompt").first
            prompt.wait_for(timeout=600_000)
            shown = prompt.inner_text()
            assert panel.locator(".sftkit-feedback-candidate").count() == 2
            panel.locator("button", has_text=button).first.click()
            wait_for(lambda: n_ratings() >= before + n, timeout=60, what=f"rating {n} in ratings.jsonl")
            page.wait_for_function("([el, old]) => el.isConnected === false || el.innerText !== old",
                                   arg=[prompt.element_handle(), shown], timeout=120_000)
        kinds = [json.loads(line)["kind"] for line in ratings.read_text().splitlines()[before:]]
        assert len(kinds) == 2 and set(kinds) <= {"pair", "tie"}, kinds  # a tie only when A and B are the same text
        counter = panel.locator(".sftkit-feedback-count").first
        pairs = kinds.count("pair")
        page.wait_for_function("([el, n]) => el.innerText.includes(n + ' pairs')",
                               arg=[counter.element_handle(), str(pairs)], timeout=30_000)
    except Exception:
        page.screenshot(path="/tmp/sftkit-feedback-failure.png", full_page=True)
        raise
    page.screenshot(path=str(tmp_path / "feedback.png"), full_page=True)
    keep_screenshot(widget_output(panel, page, ".sftkit-feedback-count"), "feedback", tmp_path)


# ---- the guard against skipping in CI ------------------------------------------------------
def run_pytest_on_this_file(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
                           "-k", "start_notebook", "-rs", *args], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=300)


def no_chromium_env(tmp_path, ci: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(Path(sys.executable).parent)  # no chromium on it
    if ci is not None:
        env["CI"] = ci
    return env


def test_without_chromium_the_browser_tests_fail_under_ci_and_skip_saying_why_elsewhere(tmp_path):
    out = run_pytest_on_this_file(no_chromium_env(tmp_path, "true"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 error" in out.stdout and "skipped" not in out.stdout, out.stdout
    assert "CI=true: the browser tests must run, but Debian chromium not installed" in out.stdout
    out = run_pytest_on_this_file(no_chromium_env(tmp_path, None))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout and "Debian chromium not installed" in out.stdout, out.stdout


def test_without_playwright_the_browser_tests_fail_under_ci(tmp_path):
    if CHROMIUM is None:  # it hides playwright where chromium is installed, which `make test` does
        missing_piece("Debian chromium not installed (this check hides playwright where chromium is)")
    stub = tmp_path / "stub" / "playwright"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('playwright hidden by the test')\n")
    env = dict(os.environ, CI="1", PYTHONPATH=os.pathsep.join(filter(None, [str(stub.parent),
                                                                         os.environ.get("PYTHONPATH")])))
    out = run_pytest_on_this_file(env)
    assert out.returncode == 1 and "1 error" in out.stdout, out.stdout + out.stderr
    assert "playwright is not importable" in out.stdout and "skipped" not in out.stdout, out.stdout


def fake_path(tmp_path, *tools: str) -> str:
    """A PATH holding only ``tools`` (``chromium`` as a stub; others linked from this machine)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for tool in tools:
        if tool == "chromium":
            (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
            (bin_dir / tool).chmod(0o755)
        else:
            (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


def browser_deps(path: str, ci: str | None, **extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({"PATH": path, "VENV": str(ROOT / ".venv"), **extra})
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(["/bin/bash", str(ROOT / ".ci" / "browser-deps.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_browser_deps_script_fails_under_ci_when_it_cannot_provide_chromium(tmp_path, ci):
    out = browser_deps(fake_path(tmp_path, "id"), ci)  # no chromium, no apt-get to install it
    assert out.returncode != 0, out.stderr
    assert "chromium" in out.stderr


def test_browser_deps_script_warns_and_continues_outside_ci(tmp_path):
    out = browser_deps(fake_path(tmp_path, "id"), None)
    assert out.returncode == 0, out.stderr
    assert "chromium" in out.stderr and "skipped" in out.stderr
    out = browser_deps(fake_path(tmp_path / "x", "id"), "false")
    assert out.returncode == 0, out.stderr


def test_browser_deps_script_checks_playwright_under_ci(tmp_path):
    path = fake_path(tmp_path, "id", "chromium")
    assert browser_deps(path, "true").returncode == 0
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # a python without playwright
    (venv / "bin" / "python").chmod(0o755)
    out = browser_deps(path, "true", VENV=str(venv))
    assert out.returncode != 0 and "playwright" in out.stderr, out.stderr


def test_a_saved_shootout_reopens_in_the_browser_with_the_table_and_every_methods_curve(lab, page, tmp_path,
                                                                                      tiny_llama_dir, cache):
    """A shoot-out of the course's four families (trained here on the tiny model; the notebook's own run of
    all seven methods is the nbclient test's), reopened from its store in a notebook as a user does after a
    restart: the table and the overlaid curves render in the browser."""
    import nbformat

    from sftkit.engine.shootout import METHODS, Budget, compare_methods

    names = ["IA3", "prompt tuning", "LoRA", "BitFit"]  # adapters, soft prompts, LoRA, BitFit
    assert set(names) <= set(METHODS)
    result = compare_methods("dates", names, Budget(steps=2, batch_size=4, rows=40, eval_items=6),
                             model=str(tiny_llama_dir), store=lab["notebooks"] / "shootout-runs")
    assert result.complete, result.text()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        'from sftkit.ui import ShootoutView\nShootoutView.reopen("shootout-runs")')])
    nb.metadata["kernelspec"] = {"name": "sftkit", "display_name": "sftkit (Python 3)", "language": "python"}
    nbformat.write(nb, str(lab["notebooks"] / "shootout-reopen.ipynb"))
    panel = open_alone(page, lab, "shootout-reopen.ipynb", "shootout-test")
    run_all(page)
    try:
        wait_for_all_cells(page, timeout=120_000)
        table = panel.locator("table.sftkit-shootout-table").first
        table.wait_for(timeout=60_000)
        rows = table.locator("tr")
        assert rows.count() == 1 + len(names)  # header + one row per method
        shown = [" ".join(rows.nth(i).locator("td").first.text_content().split()) for i in range(1, len(names) + 1)]
        assert shown == names, shown
        text = table.text_content()
        assert "best" in text and "%" in text, text
        chart = panel.locator(".js-plotly-plot", has=page.locator(".gtitle", has_text="training loss, every method")).first
        chart.wait_for(timeout=30_000)
        assert chart.locator(".scatterlayer .trace").count() == len(names)
    except Exception:
        page.screenshot(path="/tmp/sftkit-shootout-failure.png", full_page=True)
        raise
    keep_screenshot(widget_output(panel, page, "table.sftkit-shootout-table"), "shootout", tmp_path)
