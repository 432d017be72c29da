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
