"""Config fields declare their help, allowed values and widget hint once; the checks, the example
config's comments and the launcher's knob specs all come from that. Pure Python, no models."""

import dataclasses
import math

import pytest
import yaml

from sftkit.core.examples import COMMENTS, commented_yaml, example_config, example_config_yaml
from sftkit.core.fields import (
    ALLOWED,
    HELP,
    WIDGET,
    WIDGETS,
    Allowed,
    Choice,
    Flag,
    Int,
    Names,
    Number,
    Text,
    check_fields,
    setting,
)
from sftkit.core.runconfig import (
    SECTIONS,
    RunConfig,
    RunConfigError,
    TrainingConfig,
    config_fields,
    knob_spec,
    knob_specs,
)

FIELDS = dict(config_fields())
# what other fields need for a value to be taken on its own (a preset that needs top_n, a file that needs a template)
SUPPORT = {"adapter.preset": {"adapter": {"top_n": 2}},
           "adapter.prompt_init": {"adapter": {"preset": "prompt_tuning"}},  # prompt tuning's knob only
           "data.source": {"template": {"user_pattern": "Q: {q}", "answer_field": "a"}}}


def build(dotted: str, value) -> RunConfig:
    """A config with one field set (through the same path YAML takes)."""
    section, _, name = dotted.rpartition(".")
    data = {key: dict(v) for key, v in SUPPORT.get(dotted, {}).items()}
    if section:
        data.setdefault(section, {})[name] = value
    else:
        data[name] = value
    return RunConfig.from_dict(data)


def value_of(cfg: RunConfig, dotted: str):
    section, _, name = dotted.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def outside(allowed: Allowed) -> list:
    """Values ``allowed`` refuses: wrong types, just past each bound, unknown choices."""
    bad: list = [] if allowed.null is not None else [None]
    if isinstance(allowed, Number):
        bad += ["not-a-number", True, [1]]
        if allowed.kind == "int":
            bad += [1.5]
            if allowed.min is not None:
                bad.append(allowed.min - 1)
            if allowed.max is not None:
                bad.append(allowed.max + 1)
        else:
            bad += [math.nan, math.inf]
            if allowed.min is not None:
                bad.append(allowed.min if allowed.min_open else math.nextafter(allowed.min, -math.inf))
            if allowed.max is not None:
                bad.append(allowed.max if allowed.max_open else math.nextafter(allowed.max, math.inf))
    elif isinstance(allowed, Choice):
        bad += ["not-a-choice", allowed.options[0].upper() + "!", 3]
    elif isinstance(allowed, Flag):
        bad += ["yes", 1, 0]
    elif isinstance(allowed, Text):
        bad += ["", "   ", 5, ["x"]]
        if allowed.max_len is not None:
            bad.append("x" * (allowed.max_len + 1))
        bad += [f"a{c}b" for c in allowed.forbid]
    elif isinstance(allowed, Names):
        bad += ["q_proj", [1], [None], {"a": 1}]
    else:
        raise AssertionError(f"no generated values for {type(allowed).__name__}")
    return bad


def inside(allowed: Allowed) -> list:
    """Values ``allowed`` takes: each bound that is in, just inside an open one, every choice."""
    good: list = [None] if allowed.null is not None else []
    if isinstance(allowed, Number):
        if allowed.kind == "int":
            good += [v for v in (allowed.min, allowed.max) if v is not None]
        else:
            lo, hi = allowed.min, allowed.max
            if lo is not None:
                good.append(math.nextafter(lo, math.inf) if allowed.min_open else lo)
            if hi is not None:
                good.append(math.nextafter(hi, -math.inf) if allowed.max_open else hi)
    elif isinstance(allowed, Choice):
        good += list(allowed.options)
    elif isinstance(allowed, Flag):
        good += [True, False]
    elif isinstance(allowed, Text):
        good += ["x" * (allowed.max_len or 8)]
    elif isinstance(allowed, Names):
        good += [[], ["b", "a", "b"]]
    return good


def cases(make):
    return [pytest.param(name, v, id=f"{name}={v!r}") for name, f in FIELDS.items() for v in make(f.metadata[ALLOWED])]


# ---- every field declares itself ------------------------------------------------------------------
@pytest.mark.parametrize("dotted", list(dict(config_fields(sections=True))))
def test_every_field_has_one_line_of_help(dotted):
    f = dict(config_fields(sections=True))[dotted]
    text = f.metadata.get(HELP)
    assert isinstance(text, str) and text.strip() and "\n" not in text, f"{dotted} has no help"


@pytest.mark.parametrize("dotted", list(FIELDS))
def test_every_setting_has_allowed_values_and_a_fitting_widget_hint(dotted):
    f = FIELDS[dotted]
    allowed = f.metadata.get(ALLOWED)
    assert isinstance(allowed, Allowed), f"{dotted} declares no allowed values"
    assert allowed.describe()
    assert WIDGET in f.metadata, f"{dotted} declares no widget hint (None: not a knob)"
    widget = f.metadata[WIDGET]
    if widget is None:
        assert isinstance(allowed, Names), f"{dotted}: only lists are left without a knob"
    else:
        assert WIDGETS[widget] in {c.__name__ for c in type(allowed).__mro__}
    # the default is itself allowed
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    assert allowed.check(default), f"{dotted}: the default {default!r} is out of its own range"


def test_every_section_field_is_declared_with_setting():
    for key, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{key}.{f.name}" in FIELDS and f.metadata.get(ALLOWED) is not None


def test_setting_refuses_a_declaration_without_help_or_with_a_wrong_widget():
    with pytest.raises(TypeError):
        setting(1, allowed=Int(0))  # help is required
    with pytest.raises(ValueError, match="one non-empty line"):
        setting(1, help="", allowed=Int(0))
    with pytest.raises(ValueError, match="does not edit"):
        setting(1, help="x", allowed=Int(0), widget="choice")
    with pytest.raises(ValueError, match="not one of"):
        setting(1, help="x", allowed=Int(0), widget="slider")


# ---- the checks come from the metadata ------------------------------------------------------------
@pytest.mark.parametrize("dotted,value", cases(outside))
def test_out_of_range_values_are_refused_naming_the_field(dotted, value):
    allowed = FIELDS[dotted].metadata[ALLOWED]
    with pytest.raises(RunConfigError) as err:
        build(dotted, value)
    msg = str(err.value)
    assert msg.startswith(f"{dotted}="), msg
    assert f" is not allowed; allowed: {allowed.describe()}" in msg


@pytest.mark.parametrize("dotted,value", cases(inside))
def test_values_in_range_are_taken(dotted, value):
    cfg = build(dotted, value)
    stored = value_of(cfg, dotted)
    assert stored == (sorted(set(value)) if isinstance(value, list) else value)


def test_messages_keep_their_wording():
    cases = {
        ("training", "batch_size", 0): "training.batch_size=0 is not allowed; allowed: an integer from 1 to 4096",
        ("data", "rows", 1): "data.rows=1 is not allowed; allowed: null (all) or an integer >= 2",
        ("training", "epochs", 0): "training.epochs=0 is not allowed; allowed: a number in (0, 1000]",
        ("adapter", "alpha", 0): "adapter.alpha=0 is not allowed; allowed: a number > 0",
        ("data", "eval_fraction", 1): "data.eval_fraction=1 is not allowed; allowed: a number in [0, 1) "
                                      "(0: no eval split)",
        ("model", "device", "tpu"): "model.device='tpu' is not allowed; allowed: auto, cpu, cuda",
        ("training", "packing", "yes"): "training.packing='yes' is not allowed; allowed: auto, on, off",
    }
    for (section, name, value), expected in cases.items():
        with pytest.raises(RunConfigError) as err:
            RunConfig.from_dict({section: {name: value}})
        assert str(err.value) == expected


def test_numeric_strings_are_coerced_by_kind():
    t = TrainingConfig(learning_rate="2e-4", batch_size="8", max_steps="1e3", warmup="3")
    assert (t.learning_rate, t.batch_size, t.max_steps, t.warmup) == (0.0002, 8, 1000, 3)
    assert type(t.batch_size) is int and type(t.warmup) is int


def test_cross_field_rules_stay():
    with pytest.raises(RunConfigError, match="training.warmup=2.5"):
        TrainingConfig(warmup=2.5)
    assert TrainingConfig(warmup=3).warmup == 3
    with pytest.raises(RunConfigError, match="early stopping needs evaluations"):
        TrainingConfig(early_stopping_patience=1)
    with pytest.raises(RunConfigError, match="multiple of training.eval_every=4"):
        TrainingConfig(early_stopping_patience=1, eval_every=4, checkpoint_every=6)
    with pytest.raises(RunConfigError, match="preset freeze_tuning needs it"):
        RunConfig(adapter={"preset": "freeze_tuning"})


def test_a_new_dataclass_gets_its_checks_from_one_declaration():
    @dataclasses.dataclass
    class Toy:
        n: int = setting(3, help="a count", allowed=Int(1, 9), widget="int")

        def __post_init__(self):
            check_fields(self, "toy", RunConfigError)

    assert Toy("4").n == 4
    with pytest.raises(RunConfigError, match=r"^toy\.n=10 is not allowed; allowed: an integer from 1 to 9$"):
        Toy(10)


# ---- the example config's comments come from the help -------------------------------------------
def test_example_yaml_has_a_comment_above_every_field():
    lines = example_config_yaml().splitlines()
    seen = set()
    section = ""
    for i, line in enumerate(lines):
        if not line or line.startswith("#") or line.lstrip().startswith("#"):
            continue
        key = line.strip().split(":", 1)[0]
        dotted = key if not line.startswith(" ") else f"{section}.{key}"
        if not line.startswith(" "):
            section = key
        assert lines[i - 1].lstrip().startswith("# "), f"no comment above {dotted}"
        assert lines[i - 1].lstrip()[2:] == COMMENTS[dotted]
        seen.add(dotted)
    assert seen == set(dict(config_fields(sections=True)))
    assert RunConfig.from_dict(yaml.safe_load(example_config_yaml())) == example_config()


def test_comment_is_the_help_and_the_allowed_values():
    assert COMMENTS["training.batch_size"] == "rows per device per forward pass. Allowed: an integer from 1 to 4096"
    assert COMMENTS["training.group_by_length"] == FIELDS["training.group_by_length"].metadata[HELP]  # a flag: help only


def test_a_field_without_a_comment_is_an_error_not_skipped():
    comments = {k: v for k, v in COMMENTS.items() if k != "training.seed"}
    with pytest.raises(RunConfigError, match="no comment for training.seed"):
        commented_yaml(example_config(), comments)


# ---- the launcher's knobs come from the same metadata ---------------------------------------------
def test_knob_spec_example():
    spec = knob_spec("training.batch_size")
    assert (spec.name, spec.label, spec.kind, spec.min, spec.max, spec.step, spec.choices) == \
        ("training.batch_size", "batch size", "int", 1, 4096, 1, ())
    assert spec.help == "rows per device per forward pass" and spec.default == 8
    lr = knob_spec("training.learning_rate")
    assert lr.kind == "log_float" and (lr.min, lr.max, lr.min_open) == (0, 1, True)
    assert (lr.log_min, lr.log_max) == (-6, -1)
    assert knob_spec("model.quantization").choices == ("auto", "4bit", "8bit", "none")
    steps = knob_spec("training.max_steps")
    assert steps.nullable and steps.null_means == "use epochs" and steps.widget_min == 0
    with pytest.raises(RunConfigError, match="not a knob"):
        knob_spec("adapter.add_lora")
    with pytest.raises(RunConfigError, match="unknown field training.batchsize"):
        knob_spec("training.batchsize")


def test_knob_specs_cover_every_knob_of_a_section():
    assert [s.name for s in knob_specs("")] == ["name", "store", "objective"]
    for key in SECTIONS:
        assert [s.name for s in knob_specs(key)] == [n for n, f in FIELDS.items()
                                                     if n.startswith(key + ".") and f.metadata[WIDGET]]


@pytest.mark.parametrize("spec", [s for key in ("", *SECTIONS) for s in knob_specs(key)], ids=lambda s: s.name)
def test_knob_ranges_are_the_validation_ranges(spec):
    """The bounds a widget gets are exactly the ones the config takes and refuses."""
    if spec.kind in ("int", "float", "log_float"):
        for bound, is_open, direction in ((spec.min, spec.min_open, -1), (spec.max, spec.max_open, 1)):
            if bound is None:
                continue
            inner = bound if not is_open else (math.nextafter(bound, -direction * math.inf) if spec.kind != "int"
                                               else bound - direction)
            assert value_of(build(spec.name, inner), spec.name) == inner
            past = bound if is_open else (bound + direction if spec.kind == "int"
                                          else math.nextafter(bound, direction * math.inf))
            with pytest.raises(RunConfigError, match=f"^{spec.name}="):
                build(spec.name, past)
        assert spec.widget_min <= spec.widget_max
        if spec.min is not None and not spec.nullable:
            assert spec.widget_min == spec.min
        if spec.max is not None:
            assert spec.widget_max == spec.max
        if spec.span:
            assert all(build(spec.name, v) for v in spec.span)
    if spec.kind == "choice":
        for choice in spec.choices:
            assert value_of(build(spec.name, choice), spec.name) == choice
        assert spec.choices == FIELDS[spec.name].metadata[ALLOWED].options
    if spec.nullable:
        assert value_of(build(spec.name, None), spec.name) is None


# ---- the proof: group_by_length was one declaration plus its use ----------------------------------
def test_group_by_length_is_declared_once_and_reaches_training_arguments(tmp_path):
    spec = knob_spec("training.group_by_length")
    assert spec.kind == "bool" and "padding" in spec.help and spec.default is False
    assert "training.group_by_length" in COMMENTS
    with pytest.raises(RunConfigError, match="training.group_by_length='yes'"):
        RunConfig(training={"group_by_length": "yes"})
    pytest.importorskip("transformers")
    from sftkit.engine.train import build_training_arguments

    def args(on: bool):
        cfg = RunConfig(training={"group_by_length": on, "max_steps": 2})
        return build_training_arguments(cfg, tmp_path, device="cpu", compute_dtype="float32", has_eval=False)

    def grouped(a) -> bool:
        return getattr(a, "train_sampling_strategy", None) == "group_by_length" or getattr(a, "group_by_length", False)

    assert grouped(args(True)) and not grouped(args(False))
