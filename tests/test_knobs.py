"""The notebooks' workshop knobs (sftkit.notebook_knob): one knob by hand, the whole fast profile by one
variable, the value as committed otherwise; bad values named."""

import pytest

import sftkit
from sftkit.core.errors import ConfigError

KNOBS = ("SFTKIT_NOTEBOOK_FAST", "SFTKIT_NOTEBOOK_STEPS", "SFTKIT_NOTEBOOK_ITEMS", "SFTKIT_NOTEBOOK_METHODS")


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in KNOBS:
        monkeypatch.delenv(var, raising=False)


def test_as_committed_then_the_fast_profile_then_one_knob_by_hand(monkeypatch):
    assert sftkit.notebook_knob("steps", 60, fast=3) == 60
    monkeypatch.setenv("SFTKIT_NOTEBOOK_FAST", "1")
    assert sftkit.notebook_knob("steps", 60, fast=3) == 3
    assert sftkit.notebook_knob("methods", "LoRA,DoRA", fast="LoRA") == "LoRA"
    assert sftkit.notebook_knob("items", 40) == 40  # a knob without a fast value keeps its own
    monkeypatch.setenv("SFTKIT_NOTEBOOK_STEPS", "10")  # one knob by hand wins over the profile
    assert sftkit.notebook_knob("steps", 60, fast=3) == 10
    monkeypatch.setenv("SFTKIT_NOTEBOOK_FAST", "off")
    assert sftkit.notebook_knob("items", 40, fast=8) == 40


@pytest.mark.parametrize("var,value,words", [
    ("SFTKIT_NOTEBOOK_STEPS", "ten", "SFTKIT_NOTEBOOK_STEPS='ten' is not a whole number"),
    ("SFTKIT_NOTEBOOK_STEPS", "0", "SFTKIT_NOTEBOOK_STEPS='0' is not allowed; allowed: a whole number >= 1"),
    ("SFTKIT_NOTEBOOK_FAST", "maybe", "SFTKIT_NOTEBOOK_FAST='maybe' is not allowed; allowed: 1/true/yes/on"),
])
def test_bad_values_name_the_variable_and_what_is_allowed(monkeypatch, var, value, words):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        sftkit.notebook_knob("steps", 60, fast=3)


def test_every_notebook_reads_its_knobs_through_notebook_knob():
    import nbformat
    from test_notebooks import NOTEBOOKS

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        src = "\n".join(c.source for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code")
        assert "os.environ" not in src, path.name
