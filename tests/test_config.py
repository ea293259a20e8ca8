"""Config loading and validation: errors name the key, before any work."""

from __future__ import annotations

import pytest
import yaml

from ftguard.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    packaged_configs,
)
from ftguard.schema import ConfigError


def test_defaults_follow_booster_protocol():
    cfg = RunConfig()
    assert cfg.seed == 43
    assert cfg.align.train.learning_rate == 5e-4 and cfg.align.train.lr_scheduler == "constant"
    assert cfg.finetune.train.learning_rate == 1e-5
    assert cfg.align.train.batch_size == 10 and cfg.align.train.epochs == 20
    assert (
        cfg.adapter.align.r == 32
        and cfg.adapter.align.alpha == 4
        and cfg.adapter.align.target_modules == ["q_proj", "k_proj", "v_proj"]
    )
    assert cfg.data.finetune.n == 1000 and cfg.data.finetune.harmful_ratio == 0.1
    assert cfg.evaluate.judge == "ftguard-judge" and cfg.evaluate.max_new_tokens == 512
    assert cfg.align.train.max_grad_norm == 1.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"modle": {}}, "unknown key 'modle'; did you mean 'model'?"),
        (
            {"model": {"nmae": "tiny"}},
            "unknown key 'model.nmae'; did you mean 'model.name'?".replace("model.name", "name"),
        ),
        ({"seed": "x"}, "'seed' must be an integer"),
        ({"model": {"dtype": "fp8"}}, "'model.dtype' must be one of"),
        ({"data": {"finetune": {"harmful_ratio": 1.5}}}, "'data.finetune.harmful_ratio' must be in [0, 1]"),
        ({"data": {"finetune": {"harmful_ratio": -0.1}}}, "'data.finetune.harmful_ratio' must be in [0, 1]"),
        ({"data": {"finetune": {"n": 0}}}, "'data.finetune.n' must be ≥ 1"),
        ({"align": {"train": {"batch_size": 0}}}, "'align.train.batch_size' must be ≥ 1"),
        ({"align": {"train": {"learning_rate": "fast"}}}, "'align.train.learning_rate' must be a number"),
        ({"adapter": {"align": {"dropout": 1.0}}}, "'adapter.align.dropout' must be in [0, 1)"),
        ({"adapter": {"topology": "triple"}}, "'adapter.topology' must be one of"),
        ({"model": {"trust_remote_code": "yes"}}, "'model.trust_remote_code' must be true or false"),
        ({"align": None, "evaluate": {"points": ["align"]}}, "lists 'align' but the align stage is null"),
        ({"evaluate": {"points": ["aligned"]}}, "'evaluate.points' entries must be among"),
        ({"data": {"alignment": {"source": "jsonl"}}}, "'data.alignment.path' is required"),
    ],
)
def test_bad_values_name_their_key(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_scientific_notation_without_dot_is_a_number():
    cfg = config_from_dict(yaml.safe_load("align: {train: {learning_rate: 1e-5}}"))
    assert cfg.align.train.learning_rate == pytest.approx(1e-5)


def test_overrides_apply_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel: {name: tiny}\n")
    cfg = load_config(
        str(path), ["align.train.max_steps=3", "data.finetune.harmful_ratio=[0, 0.2]", "seed=7"]
    )
    assert cfg.align.train.max_steps == 3 and cfg.data.finetune.ratios == [0.0, 0.2] and cfg.seed == 7
    with pytest.raises(ConfigError, match="unknown key 'align.train.max_step'"):
        load_config(str(path), ["align.train.max_step=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(str(path), ["seed"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(str(path))


def test_unknown_config_name_suggests_packaged_one():
    from ftguard.errors import FtguardError

    with pytest.raises(FtguardError, match="did you mean 'quickstart-tiny'"):
        load_config("quickstart-tiyn")


@pytest.mark.parametrize("name", sorted(packaged_configs()))
def test_every_packaged_config_validates_and_round_trips(name):
    cfg = load_config(name)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert cfg.description, "packaged configs describe themselves"


def test_fingerprint_depends_only_on_named_sections():
    a, b = RunConfig(), config_from_dict({"evaluate": {"max_new_tokens": 8}})
    assert a.fingerprint("model", "align") == b.fingerprint("model", "align")
    assert a.fingerprint() != b.fingerprint()


def test_bare_no_in_yaml_means_the_option_no():
    cfg = config_from_dict(yaml.safe_load("align: {train: {mixed_precision: no}}"))
    assert cfg.align.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="must be one of"):
        config_from_dict(yaml.safe_load("align: {train: {mixed_precision: yes}}"))
