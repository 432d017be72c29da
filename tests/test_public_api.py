"""The public API is what the notebooks and the README use: ``sftkit`` and ``sftkit.ui`` only.

Every code cell of notebooks/*.ipynb and every ```python block of README.md is parsed with
``ast``; an import from (or an attribute path into) ``sftkit.core``, ``sftkit.engine`` or
``sftkit.state`` fails, naming the file and line. Every name they take from ``sftkit`` /
``sftkit.ui`` must be in that module's ``__all__`` and resolve. The notebooks on disk must be
what lab/build_notebooks.py generates.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = ("sftkit.core", "sftkit.engine", "sftkit.state")
PUBLIC = ("sftkit", "sftkit.ui")


def _ipython_free(source: str) -> str:
    """Comment out IPython-only lines (magics, shell escapes) so ``ast`` can parse the cell."""
    return "\n".join("#" + line if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def code_snippets() -> list[tuple[str, int, str]]:
    """(where, first line number - 1, source) for every notebook code cell and README python block."""
    out = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                out.append((f"{path.relative_to(ROOT)} cell {i}", 0, src))
    readme = (ROOT / "README.md").read_text()
    for m in re.finditer(r"^```python[^\n]*\n(.*?)^```", readme, re.M | re.S):
        first = readme[: m.start(1)].count("\n")  # lines before the block's first line
        out.append(("README.md", first, m.group(1)))
    return out


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _internal(module: str) -> bool:
    """core/engine/state and the ui's own modules (``sftkit.ui.run_launcher``): not the public face."""
    if any(module == p or module.startswith(p + ".") for p in INTERNAL):
        return True
    import sftkit.ui

    parts = module.split(".")
    return len(parts) > 2 and parts[1] == "ui" and parts[2] not in sftkit.ui.__all__


def scan(where: str, offset: int, source: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(problems, uses): internal imports/paths found, and (location, module, name) taken from
    the public modules, by ``from sftkit[.ui] import name`` or ``sftkit[.ui].name``."""
    tree = ast.parse(_ipython_free(source), filename=where)
    problems, uses = [], []

    def at(node):
        return f"{where} line {offset + node.lineno}"

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if _internal(node.module):
                problems.append(f"{at(node)}: from {node.module} import ...")
            elif node.module in PUBLIC:
                uses.extend((at(node), node.module, a.name) for a in node.names
                            if not (node.module == "sftkit" and a.name == "ui"))
        elif isinstance(node, ast.Import):
            problems.extend(f"{at(node)}: import {a.name}" for a in node.names if _internal(a.name))
        # attribute paths: only the outermost chain (``a.b.c``, not also ``a.b``)
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.Attribute) or isinstance(node, ast.Attribute):
                continue
            path = _dotted(child)
            if not path or not path.startswith("sftkit."):
                continue
            parts = path.split(".")
            if _internal(path):
                problems.append(f"{at(child)}: {path}")
            elif parts[1] == "ui":
                if len(parts) > 2:
                    uses.append((at(child), "sftkit.ui", parts[2]))
            else:
                uses.append((at(child), "sftkit", parts[1]))
    return sorted(problems, key=_line_order), uses


def _line_order(problem: str) -> int:
    return int(problem.split(" line ")[1].split(":")[0])


SNIPPETS = code_snippets()


def test_the_walk_sees_what_it_must_see():
    # Guards the checks below against passing vacuously.
    wheres = {w.split(" cell ")[0] for w, _, _ in SNIPPETS}
    assert "README.md" in wheres and len(wheres) >= 6, wheres
    uses = {(mod, name) for snip in SNIPPETS for _, mod, name in scan(*snip)[1]}
    assert {("sftkit", "load_model"), ("sftkit.ui", "PromptBuilder"), ("sftkit", "capture_row")} <= uses
    problems, _ = scan("x.py", 10, "import sftkit\nfrom sftkit.engine.attention import capture_row\n"
                                   "import sftkit.core.data as d\n"
                                   "sftkit.core.data.split_rows([])\nx = sftkit.state.something\n")
    assert problems == ["x.py line 12: from sftkit.engine.attention import ...",
                        "x.py line 13: import sftkit.core.data",
                        "x.py line 14: sftkit.core.data.split_rows",
                        "x.py line 15: sftkit.state.something"], problems


def test_notebooks_and_readme_import_only_the_public_api():
    problems = [p for snip in SNIPPETS for p in scan(*snip)[0]]
    assert not problems, ("import these from sftkit / sftkit.ui (export them there if needed):\n"
                          + "\n".join(problems))


def test_every_name_they_use_is_exported_and_resolves():
    bad = []
    for snip in SNIPPETS:
        for where, mod, name in scan(*snip)[1]:
            module = importlib.import_module(mod)
            if name not in module.__all__:
                bad.append(f"{where}: {mod}.{name} is not in {mod}.__all__")
                continue
            try:
                getattr(module, name)
            except AttributeError as exc:
                bad.append(f"{where}: {mod}.{name} does not resolve ({exc})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mod", PUBLIC)
def test_all_is_complete_and_every_name_resolves(mod):
    module = importlib.import_module(mod)
    table = getattr(module, "_LAZY")
    assert set(table) <= set(module.__all__)
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        getattr(module, name)  # raises if a lazy entry points nowhere


def test_notebooks_on_disk_are_what_the_builder_writes():
    spec = importlib.util.spec_from_file_location("_build_notebooks", ROOT / "lab" / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)  # defines the notebooks; writes only when run as a script
    built = builder.build()
    on_disk = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert on_disk == set(built), "notebooks/ and lab/build_notebooks.py list different notebooks"
    import nbformat

    stale = [name for name, nb in built.items()
             if json.loads(nbformat.writes(nb)) != json.loads((ROOT / "notebooks" / name).read_text())]
    assert not stale, f"stale notebooks {stale}: run `.venv/bin/python lab/build_notebooks.py`"
