"""The widgets in the Notebook 7 interface (`jupyter notebook`, `make notebook`), in headless Chromium:
the layer picker notebook opens in the sftkit kernel, the picker renders, its controls carry their
help as tooltips, and a click on a grid cell changes the count through the kernel.

The server is lab/start.sh with SFTKIT_FRONTEND=notebook on a temporary project copy (as test_browser's
JupyterLab), with a private sftkit cache. Without Chromium or playwright this skips, saying why; under
CI it fails instead.
"""

from test_browser import browser_ready, page  # noqa: F401  (fixtures: the browser checks, a Chromium page)

from helpers import keep_screenshot, linked_cache, project_copy, running_lab


def test_layer_picker_renders_and_works_in_notebook_7(browser_ready, page, tmp_path_factory,  # noqa: F811
                                                      default_model_folder, tmp_path):
    work = tmp_path_factory.mktemp("browser-notebook7")
    cache = linked_cache(work / "cache", default_model_folder)
    with running_lab(project_copy(work / "project"), cache, SFTKIT_FRONTEND="notebook") as nb:
        assert "/tree?token=" in nb["log"].read_text()  # the Notebook 7 interface, not JupyterLab
        page.goto(f"{nb['base']}/notebooks/02_layer_picker.ipynb?token={nb['token']}", timeout=60_000)
        try:
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
            page.get_by_text("sftkit (Python 3)").first.wait_for(timeout=60_000)  # the kernel, no picker dialog
            assert page.locator(".jp-Dialog", has_text="Select Kernel").count() == 0
            # the model + anatomy cell, then the picker cell
            page.locator(".jp-NotebookPanel .jp-Cell").nth(1).click()
            page.keyboard.press("Shift+Enter")
            page.keyboard.press("Shift+Enter")
            counters = page.locator(".sftkit-counters").first
            counters.wait_for(timeout=180_000)
            assert "1,843,200" in counters.inner_text()  # LoRA r=16 on attention of SmolLM2-135M
            # the inline help reaches the browser as the controls' tooltips (each widget view renders on
            # its own; the counters can be on the page before the rank slider's view is)
            page.locator("[title^='LoRA rank r']").first.wait_for(state="attached", timeout=30_000)
            cell = page.locator("button[title^='model.layers.29.mlp.up_proj']").first
            cell.scroll_into_view_if_needed()
            cell.click()
            page.locator(".sftkit-counters", has_text="1,876,992").first.wait_for(timeout=30_000)
        except Exception:
            page.screenshot(path="/tmp/sftkit-notebook7-failure.png", full_page=True)
            raise
        out = page.locator(".jp-OutputArea-output").filter(has=page.locator(".sftkit-counters")).first
        out.scroll_into_view_if_needed()
        keep_screenshot(out, "notebook7_layer_picker", tmp_path)
