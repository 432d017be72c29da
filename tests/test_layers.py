"""The layering of the package and the cost of `import sftkit`."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sftkit"

HEAVY_ML = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets", "gguf"}
WIDGETS = {"ipywidgets", "plotly", "anywidget", "IPython"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions, made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def layer_imports(layer: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PKG)): imported_modules(p) for p in (PKG / layer).rglob("*.py")}


def roots(mods):
    return {m.split(".")[0] for m in mods}


def test_walker_sees_imports_it_must_see():
    # Guards the checks below against passing vacuously.
    engine = set().union(*layer_imports("engine").values())
    assert "torch" in roots(engine)
    assert "sftkit.core.policy" in engine or "sftkit.core.policy.decide_load_plan" in engine


def test_core_imports_no_ml_and_no_widgets_and_no_upper_layer():
    for name, mods in layer_imports("core").items():
        bad = (roots(mods) & (HEAVY_ML | WIDGETS)) | {
            m for m in mods if m.startswith(("sftkit.engine", "sftkit.ui"))}
        assert not bad, f"core/{name} imports {sorted(bad)}"


def test_engine_imports_no_widgets_and_not_ui():
    for name, mods in layer_imports("engine").items():
        bad = (roots(mods) & WIDGETS) | {m for m in mods if m.startswith("sftkit.ui")}
        assert not bad, f"engine/{name} imports {sorted(bad)}"


def test_state_imports_no_widgets_and_not_ui():
    found = layer_imports("state")
    assert found, "the state layer has no modules"
    for name, mods in found.items():
        bad = (roots(mods) & WIDGETS) | {m for m in mods if m.startswith("sftkit.ui")}
        assert not bad, f"state/{name} imports {sorted(bad)}"


def test_lower_layers_never_import_state():
    for layer in ("core", "engine"):
        for name, mods in layer_imports(layer).items():
            bad = {m for m in mods if m.startswith("sftkit.state")}
            assert not bad, f"{layer}/{name} imports {sorted(bad)}"


def test_import_sftkit_is_cheap_and_changes_no_global_state():
    code = (
        "import sys, os, json, logging, time\n"
        "env = dict(os.environ); handlers = list(logging.root.handlers)\n"
        "t = time.perf_counter(); import sftkit; dt = time.perf_counter() - t\n"
        "heavy = sorted(m for m in %r if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'env_same': env == dict(os.environ),\n"
        "  'handlers_same': handlers == list(logging.root.handlers), 'seconds': dt,\n"
        "  'all': sorted(sftkit.__all__)}))\n"
    ) % (sorted(HEAVY_ML | WIDGETS | {"numpy"}),)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["heavy"] == []
    assert info["env_same"] and info["handlers_same"]
    assert {"load_model", "doctor", "plan_load"} <= set(info["all"])


def test_lazy_names_resolve():
    import sftkit

    assert callable(sftkit.load_model) and callable(sftkit.doctor)
    try:
        sftkit.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("unknown attribute did not raise")
