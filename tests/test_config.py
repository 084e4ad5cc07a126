import pytest

from mysproj.config.fields import ConfigError, config_hash, load_config
from mysproj.config.stages import PrepConfig


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_default_yaml_env_overrides_cli(tmp_path):
    y = _yaml(tmp_path, "dataset: dtd\nout: /o\nsource: /yaml\nseed: 1\ndtd_split: 2\nmax_per_class: 7\n")
    env = {"MYSPROJ_SEED": "2", "MYSPROJ_DTD_SPLIT": "3"}
    cfg = load_config(PrepConfig, yaml_file=y, env=env, overrides={"dtd_split": 4}, cli={"seed": "5"})
    assert cfg.source == "/yaml"          # YAML over default
    assert cfg.max_per_class == 7
    assert cfg.seed == 5                  # CLI over everything
    assert cfg.dtd_split == 4             # overrides over env
    assert cfg.label_underscores == "space" and cfg.prompt_style == "paper"  # defaults = the paper's
    assert load_config(PrepConfig, yaml_file=y, env=env).seed == 2  # env over YAML


def test_coercion_of_types():
    cfg = load_config(PrepConfig, env={
        "MYSPROJ_DATASET": "crisismmd", "MYSPROJ_OUT": "/o", "MYSPROJ_SOURCE": "s3://b/c",
        "MYSPROJ_CRISISMMD_CLASSES": "a, b", "MYSPROJ_CRISISMMD_MERGE": '{"x": "a"}', "MYSPROJ_MAX_PER_CLASS": "none",
        "MYSPROJ_WORKERS": "3"})
    assert cfg.crisismmd_classes == ["a", "b"]
    assert cfg.crisismmd_merge == {"x": "a"}
    assert cfg.max_per_class is None and cfg.workers == 3


@pytest.mark.parametrize("field,value,message", [
    ("seed", "-1", "config field 'seed' = -1: must be >= 0"),
    ("dtd_split", "0", "config field 'dtd_split' = 0: must be >= 1"),
    ("seed", "1.5", "config field 'seed' = '1.5': expected int"),
    ("dataset", "imagenet", "config field 'dataset' = 'imagenet': must be one of dtd, plantdoc"),
    ("label_underscores", "dash", "config field 'label_underscores' = 'dash': must be one of space, delete"),
    ("crisismmd_merge", "[1]", "config field 'crisismmd_merge' = [1]: expected a mapping"),
])
def test_bad_values_name_field_value_and_allowed(field, value, message):
    base = {"dataset": "textures-mini", "out": "/o"}
    with pytest.raises(ConfigError) as e:
        load_config(PrepConfig, overrides={**base, field: value}, env={})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_yaml_key_and_missing_required(tmp_path):
    with pytest.raises(ConfigError, match="unknown field 'sede' for PrepConfig"):
        load_config(PrepConfig, yaml_file=_yaml(tmp_path, "dataset: dtd\nsede: 1\n"), env={})
    with pytest.raises(ConfigError, match="config field 'out' is required"):
        load_config(PrepConfig, overrides={"dataset": "textures-mini"}, env={})
    with pytest.raises(ConfigError, match="'source' is required for dataset 'dtd'"):
        load_config(PrepConfig, overrides={"dataset": "dtd", "out": "/o"}, env={})


def test_config_hash_ignores_out_and_operational_knobs():
    a = load_config(PrepConfig, overrides={"dataset": "textures-mini", "out": "/a", "workers": 1}, env={})
    b = load_config(PrepConfig, overrides={"dataset": "textures-mini", "out": "/b", "workers": 8}, env={})
    c = load_config(PrepConfig, overrides={"dataset": "textures-mini", "out": "/a", "seed": 1}, env={})
    assert config_hash(a) == config_hash(b) != config_hash(c)
