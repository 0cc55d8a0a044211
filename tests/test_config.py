import pytest

from immunizer.config import ImmunizeConfig, load_config, parse_override, preset_names, split_overrides
from immunizer.errors import ImmunizerError


def test_presets_load_and_differ():
    assert preset_names() == ["quick", "standard", "tiny"]
    quick, tiny = load_config("quick"), load_config("tiny")
    assert quick.phase1.steps == 24 and tiny.phase1.steps == 3
    assert quick.sha256 != tiny.sha256 and load_config("quick").sha256 == quick.sha256


def test_file_then_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("phase1:\n  lr: 3.0e-5\n  k_percent: 2\ncycles: 3\n")
    config = load_config("quick", path, ["phase1.lr=1e-4", "data.curriculum=[strong]", "teachers.harmful=tiny"])
    assert config.phase1.lr == 1e-4 and config.phase1.k_percent == 2.0 and config.cycles == 3
    assert config.data.curriculum == ["strong"] and config.teachers.harmful == "tiny"


def test_split_overrides_keeps_commas_inside_a_yaml_value():
    assert split_overrides("phase1.adversary=inner, phase1.inner_steps=[16, 16],phase1.lr=1e-5") == [
        "phase1.adversary=inner", "phase1.inner_steps=[16, 16]", "phase1.lr=1e-5"]
    assert split_overrides("a={b: 1, c: 2},d=3") == ["a={b: 1, c: 2}", "d=3"]
    assert split_overrides("") == [] and split_overrides(" , ") == []
    config = load_config("tiny", None, split_overrides("phase1.adversary=inner,phase1.inner_steps=[16, 16]"))
    assert config.phase1.inner_steps == [16, 16]


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=1e-5") == {"a": {"b": 1e-5}}
    assert parse_override("x=true") == {"x": True}
    with pytest.raises(ImmunizerError, match="key=value"):
        parse_override("novalue")


@pytest.mark.parametrize("override,message", [
    ("phase1.lrr=1", "unknown config key 'phase1.lrr'"),
    ("phase1.lr=fast", "expects float, got .fast.; write a finite number, e.g. 1e-05"),
    ("cycles=0", "cycles must be at least 1"),
    ("phase1.k_percent=150", "k_percent"),
    ("data.curriculum=[medium]", "curriculum"),
    ("phase1=3", "is a section"),
    ("cycles.x=1", "config key 'cycles' holds a single value, not keys; write --set cycles=VALUE"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ImmunizerError, match=message):
        load_config("tiny", None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ImmunizerError, match="does not exist"):
        load_config(None, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase1: [unclosed\n")
    with pytest.raises(ImmunizerError, match="not valid YAML"):
        load_config(None, bad)
    with pytest.raises(ImmunizerError, match="unknown preset"):
        load_config("huge")


def test_defaults_are_documented_dataclasses():
    config = ImmunizeConfig()
    assert config.to_dict()["phase2"]["stabilization_beta"] > 0


def test_a_set_value_that_is_not_yaml_names_the_fix():
    import pytest

    from immunizer.errors import ImmunizerError

    with pytest.raises(ImmunizerError, match=r"--set 'a=\[': the value is not valid YAML .*close the bracket"):
        parse_override("a=[")


def test_values_that_would_crash_or_silently_break_training_are_refused():
    import pytest

    from immunizer.errors import ImmunizerError

    for override, message in (("checkpoint_every=0", "checkpoint_every must be at least 1"),
                              ("phase1.lr=.nan", "phase1.lr.*write a finite number"), ("phase2.lr=-1e-5", "lr a finite number > 0"),
                              ("phase1.batch_size=0", "batch_size must be >= 1"),
                              ("phase2.batch_size=-2", "batch_size must be >= 1")):
        with pytest.raises(ImmunizerError, match=message):
            load_config("tiny", overrides=[override])


def test_the_one_loader_layers_and_names_the_file(tmp_path):
    from dataclasses import dataclass, field

    from immunizer.config import load_layers

    @dataclass
    class Inner:
        size: int = 1

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner, metadata={"aliases": ("old",)})
        table: dict = field(default_factory=lambda: {"a": {"x": 1, "y": 2}})

    path = tmp_path / "o.yaml"
    path.write_text("old: {size: 2}\ntable: {a: {x: 5}}\n")  # a file merges mappings key by key
    config = load_layers(Outer(), config_file=path, overrides=["table.a.y=7", "table.b={z: 1}"])
    assert config.inner.size == 2 and config.table == {"a": {"x": 5, "y": 7}, "b": {"z": 1}}
    assert load_layers(Outer(), overrides=["table.a={x: 0}"]).table == {"a": {"x": 0}}  # --set replaces at its path
    path.write_text("inner: {size: big}\n")
    with pytest.raises(ImmunizerError, match="o.yaml: config key 'inner.size' expects int, got 'big'; write a whole"):
        load_layers(Outer(), config_file=path)
