"""JupyterLab from lab/start.sh in a real headless Chromium: the start notebook opens in the
project's kernel (no "Select Kernel" dialog), runs a cell, and shows its output."""

import shutil

import pytest

from test_lab import lab  # noqa: F401  (the running JupyterLab fixture)

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed "
                                "(make test installs it where it can: .ci/browser-deps.sh)")
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


def open_alone(page, lab, notebook: str, workspace: str):  # noqa: F811
    """Open ``notebook`` in a fresh workspace (so every indicator is its own) and wait for its kernel."""
    page.goto(f"{lab['base']}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={lab['token']}", timeout=60_000)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".jp-Toolbar-kernelName", has_text="sftkit (Python 3)").first.wait_for(timeout=60_000)
    panel.locator(".jp-Cell").first.wait_for(timeout=60_000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=60_000)
    return panel


def run_all(page):
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def test_start_notebook_opens_in_the_sftkit_kernel_and_runs(lab, page, tmp_path):  # noqa: F811
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


def test_prompt_builder_renders_updates_as_you_type_and_answers(lab, page, tmp_path):  # noqa: F811
    panel = open_alone(page, lab, "01_prompt_builder.ipynb", "builder-test")
    run_all(page)
    try:
        panel.locator(".sftkit-tok").first.wait_for(timeout=120_000)
    except Exception:
        page.screenshot(path="/tmp/sftkit-builder-failure.png")
        raise
    assert panel.locator('.sftkit-tok[data-trained="1"]').count() == 11  # 2021-style date + <|im_end|>
    # Typing in the user pattern re-renders the preview through the kernel.
    box = panel.locator(".widget-textarea textarea").nth(1)
    box.fill("Please rewrite: {text}")
    page.locator(".sftkit-tok", has_text="rewrite").first.wait_for(timeout=30_000)
    # Try it: the base model's answer streams into the view.
    panel.locator("button", has_text="Try it").click()
    page.get_by_text("matches the dataset answer").or_(page.get_by_text("differs from the dataset answer")) \
        .first.wait_for(timeout=120_000)
    page.screenshot(path=str(tmp_path / "builder.png"), full_page=True)


def test_layer_picker_renders_and_a_click_changes_the_count(lab, page, tmp_path):  # noqa: F811
    panel = open_alone(page, lab, "02_layer_picker.ipynb", "picker-test")
    run_all(page)
    counters = panel.locator(".sftkit-counters").first
    counters.wait_for(timeout=120_000)
    assert "1,843,200" in counters.inner_text()  # LoRA r=16 on attention of SmolLM2-135M
    # The grid: 30 block rows; click block 29's up_proj cell (frozen -> LoRA).
    cell = panel.locator("button[title^='model.layers.29.mlp.up_proj']").first
    cell.scroll_into_view_if_needed()
    cell.click()
    panel.locator(".sftkit-counters", has_text="1,876,992").first.wait_for(timeout=30_000)  # + 16 x (576+1536)
    page.screenshot(path=str(tmp_path / "picker.png"))


def test_attention_view_renders_heatmap_and_a_grid_click_opens_a_head(lab, page, tmp_path):  # noqa: F811
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
    assert panel.locator(".js-plotly-plot .heatmaplayer image, .js-plotly-plot .hm").count() >= 1
    page.screenshot(path=str(tmp_path / "attention.png"))


def test_run_launcher_start_grows_the_loss_curve_and_stop_ends_it(lab, page, tmp_path):  # noqa: F811
    panel = open_alone(page, lab, "04_training.ipynb", "training-test")
    panel.locator(".jp-Cell").nth(2).click()  # the cell that builds the launcher
    page.keyboard.press("Shift+Enter")
    start = panel.locator("button", has_text="Start").first
    start.wait_for(timeout=120_000)
    panel.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    start.click()
    line = panel.locator(".js-plotly-plot .scatterlayer .trace path.js-line").first

    def points() -> int:
        try:
            d = line.get_attribute("d", timeout=1_000) or ""
        except Exception:
            return 0
        return d.count("L") + (1 if d.startswith("M") else 0)

    try:
        page.wait_for_function("() => true")  # let the first redraw land
        for _ in range(600):
            if points() >= 3:
                break
            page.wait_for_timeout(500)
        assert points() >= 3, "the loss curve did not grow to 3 points"
        seen = points()
        panel.locator("button", has_text="Stop").first.click()
        panel.locator(".widget-html", has_text="stopped at step").first.wait_for(timeout=120_000)
        assert points() >= seen
    except Exception:
        page.screenshot(path="/tmp/sftkit-training-failure.png", full_page=True)
        raise
    page.screenshot(path=str(tmp_path / "training.png"), full_page=True)
