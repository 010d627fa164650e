"""Config fuzzing: any config either validates or fails with exit code 2 and one line, never a traceback."""
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from hvdtrain import config
from hvdtrain.cli import main
from hvdtrain.errors import ConfigError

SECTIONS = {name: list(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else None
            for name, field in config.Config.model_fields.items()}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["digits", "hdf5", "npz:/nope.npz", "cnn", "topk", "auto"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3), max_leaves=6)


@st.composite
def configs(draw):
    raw = {}
    for _ in range(draw(st.integers(0, 6))):
        section = draw(st.sampled_from(sorted(SECTIONS) + ["bogus"]))
        keys = SECTIONS.get(section)
        if keys:
            sub = raw.setdefault(section, {}) if isinstance(raw.get(section, {}), dict) else {}
            sub[draw(st.sampled_from(keys + ["typo_key"]))] = draw(values)
            raw[section] = sub
        else:
            raw[section] = draw(values)
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=configs())
def test_any_config_validates_or_names_its_error(raw):
    try:
        config.validate(raw, "fuzz.yaml")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml: ") and "\n" not in message


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=configs(), text=st.text(max_size=40))
def test_cli_exit_code_2_and_one_line(raw, text, tmp_path_factory, capsys):
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(raw) if raw else text)
    code = main(["check", "--config", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("hvdtrain: error: ")
