import pytest

from conftest import ROOT
from cpo_ray.config import ConfigError, load_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_opens_with_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("cpo-ray" in first or "ray job submit" in first), first
    assert cfg.name


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None, ["train.lr=2e-5", "train.num_workers=3", "model.lora.enabled=true", "data.train_files=[a.jsonl, b.jsonl]"]
    )
    assert cfg.train.lr == 2e-5 and cfg.train.num_workers == 3 and cfg.model.lora.enabled
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(None, ["train.lrr=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(None, ["train.max_steps=many"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_and_bad_override(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="offload_params"):
        load_config(None, ["train.offload_params=true", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match="alphapo"):
        load_config(None, ["train.loss_type=alphapo"])


def test_max_model_len_is_derived_from_max_length_and_generation_and_checked():
    """Issue 21: data.max_length 1024 with serve.max_model_len 1024 made a full-length pair unscoreable (vLLM
    clamps max_tokens=1 to 0). Derived by default; too short is an error naming both keys."""
    cfg = load_config(None)
    assert cfg.serve.max_model_len == cfg.data.max_length + cfg.eval.max_new_tokens == 1088
    assert load_config(None, ["data.max_length=200", "eval.max_new_tokens=0"]).serve.max_model_len == 201
    with pytest.raises(ConfigError, match=r"serve\.max_model_len=1024 is shorter than data\.max_length=1024"):
        load_config(None, ["serve.max_model_len=1024"])
    with pytest.raises(ConfigError, match="max_position_embeddings=256"):
        load_config(None, ["model.tiny.max_position_embeddings=256", "data.max_length=300"])


def test_file_order_and_length_grouping_exclude_each_other():
    assert not load_config(None, ["train.shuffle=false", "train.group_by_length=0"]).train.shuffle
    with pytest.raises(ConfigError, match=r"train\.shuffle=false .* train\.group_by_length=16"):
        load_config(None, ["train.shuffle=false"])
