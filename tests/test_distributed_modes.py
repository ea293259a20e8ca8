"""Training modes under a launcher: how a run finds its mode, which methods refuse which mode and where, and the
accelerate configs in accelerate/ (checked offline with accelerate's own launcher code: no GPU, no DeepSpeed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

import ftguard.methods  # noqa: F401  (registers the built-in methods)
from ftguard import distributed
from ftguard.errors import FtguardError
from ftguard.methods.registry import all_methods, get_method
from ftguard.resolve import load_run

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate"


def _method(name: str, stage: str, args: dict | None = None):
    return get_method(name, stage).from_args(args)


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({}, "single"),
        ({"WORLD_SIZE": "1"}, "single"),
        ({"WORLD_SIZE": "8"}, "ddp"),
        ({"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"}, "fsdp"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "deepspeed_zero2"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "deepspeed_zero3"),
        ({"ACCELERATE_USE_FSDP": "false", "WORLD_SIZE": "2"}, "ddp"),
    ],
)
def test_launch_mode_reads_the_launchers_environment(env, mode):
    assert distributed.launch_mode(env) == mode


def test_launch_mode_reads_the_zero_stage_of_a_deepspeed_config_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    assert distributed.launch_mode(env) == "deepspeed_zero3"


def test_trainer_mode_reads_the_accelerator():
    from accelerate.utils import DistributedType

    def acc(kind, n=2, stage=None):
        plugin = SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(
            distributed_type=kind, num_processes=n, state=SimpleNamespace(deepspeed_plugin=plugin)
        )

    assert distributed.trainer_mode(acc(DistributedType.NO, 1)) == "single"
    assert distributed.trainer_mode(acc(DistributedType.MULTI_GPU)) == "ddp"
    assert distributed.trainer_mode(acc(DistributedType.MULTI_CPU)) == "ddp"
    assert distributed.trainer_mode(acc(DistributedType.FSDP)) == "fsdp"
    assert distributed.trainer_mode(acc(DistributedType.DEEPSPEED, stage=3)) == "deepspeed_zero3"
    assert distributed.trainer_mode(acc(DistributedType.DEEPSPEED, stage=1)) == "deepspeed_zero1"


# ---------------------------------------------------------------------------------------------- refusals


def test_every_method_runs_in_one_process_and_data_parallel_and_names_only_known_modes():
    for name, cls in all_methods().items():
        assert set(cls.unsupported_modes) <= set(distributed.MODES), name
        assert not {"single", "ddp"} & set(cls.unsupported_modes), name
        assert all(reason and "\n" not in reason for reason in cls.unsupported_modes.values()), name


@pytest.mark.parametrize(
    ("name", "stage", "refused"),
    [
        ("sft", "align", ()),
        ("random_vaccine", "align", ()),
        ("vaccine", "align", distributed.SHARDED),
        ("tvaccine", "align", ("fsdp", *distributed.DEEPSPEED)),
        ("repnoise", "align", distributed.SHARDED),
        ("booster", "align", ("fsdp", *distributed.DEEPSPEED)),
        ("booster_vaccine", "align", ("fsdp", *distributed.DEEPSPEED)),
        ("lisa", "finetune", distributed.SHARDED),
        ("bso", "finetune", distributed.SHARDED),
        ("ewc", "finetune", ("fsdp", *distributed.DEEPSPEED)),
        ("kl", "finetune", distributed.SHARDED),
        ("ldifs", "finetune", distributed.SHARDED),
        ("asft", "finetune", distributed.SHARDED),
        ("smart", "finetune", distributed.SHARDED),
        ("panacea", "finetune", ("fsdp", *distributed.DEEPSPEED)),
        ("vlguard_reg", "finetune", ()),
    ],
)
def test_methods_refuse_the_modes_they_cannot_run_under(name, stage, refused):
    method = _method(name, stage)
    for mode in distributed.MODES:
        if mode in refused:
            with pytest.raises(FtguardError) as err:
                distributed.check_supported(method, stage, mode)
            message = str(err.value)
            assert "\n" not in message
            assert f"{stage}.method '{name}'" in message and mode in message, message
            assert "accelerate/ddp.yaml" in message and "ddp" in message.split("runs under:")[1], message
        else:
            distributed.check_supported(method, stage, mode)


def test_filter_refuses_what_its_then_method_refuses():
    method = _method("filter", "finetune", {"judge": "keyword", "then": "lisa"})
    with pytest.raises(FtguardError, match="'filter' cannot train under fsdp: it keeps whole copies"):
        distributed.check_supported(method, "finetune", "fsdp")
    distributed.check_supported(_method("filter", "finetune", {"judge": "keyword"}), "finetune", "fsdp")


def _booster_run(tmp_path):

    return load_run("booster-tiny", [f"output_dir={tmp_path / 'run'}", "align.train.max_steps=2"])


def test_a_run_is_refused_before_any_work_from_the_launchers_environment(tmp_path, monkeypatch):
    from ftguard.pipeline.run import Pipeline

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    run = _booster_run(tmp_path)
    with pytest.raises(
        FtguardError, match=r"align\.method 'booster' cannot train under deepspeed_zero3: its probe"
    ):
        Pipeline(run).prepare(need_judge=False)
    assert not (tmp_path / "run" / "align").exists()


def test_a_stage_is_refused_in_the_mode_its_trainer_set_up_before_training(tmp_path, monkeypatch):
    """The launcher's variables may be missing (TrainingArguments can turn FSDP on): the Trainer's accelerator
    decides, checked once the trainer exists and before its first step."""
    from ftguard.pipeline.run import Pipeline

    seen = []

    def mode(accelerator):
        seen.append(accelerator)
        return "fsdp"

    monkeypatch.setattr(distributed, "trainer_mode", mode)
    with pytest.raises(FtguardError, match=r"align\.method 'booster' cannot train under fsdp"):
        Pipeline(_booster_run(tmp_path)).run_all(train=("align",), evaluate=False)
    assert seen, "the check used the trainer's accelerator"
    align = tmp_path / "run" / "align"
    assert not (align / "COMPLETE.json").exists() and not list(align.glob("checkpoints/checkpoint-*"))


# ---------------------------------------------------------------------------------------------- configs


def _launch(name: str) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file accelerate/NAME.yaml -m ftguard.cli run X` would set up: the parsed
    arguments (config merged in, validated) and the environment of the launched processes."""
    import accelerate.commands.launch as launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    # The one step of `accelerate launch` that merges the config file into the arguments has no public name.
    _validate_launch_command = getattr(launch, "_validate_launch_command", None)
    if _validate_launch_command is None:
        pytest.skip(
            "this accelerate has no _validate_launch_command: its launcher cannot be replayed offline"
        )
    launch_command_parser = launch.launch_command_parser

    argv = ["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "ftguard.cli", "run", "x"]
    args, defaults, mixed_precision_from_config = _validate_launch_command(
        launch_command_parser().parse_args(argv)
    )
    if args.use_deepspeed:
        # As accelerate's launch_command does before it calls the DeepSpeed launcher.
        fields = list(defaults.deepspeed_config) + (
            ["mixed_precision"] if mixed_precision_from_config else []
        )
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


EXPECTED = {
    "ddp": "ddp",
    "fsdp-lora": "fsdp",
    "deepspeed-zero2": "deepspeed_zero2",
    "deepspeed-zero3": "deepspeed_zero3",
}


def test_the_shipped_configs_are_exactly_these():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_config_has_only_keys_accelerate_knows_and_launches_the_mode_ftguard_detects(name):
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))  # unknown top-level keys raise
    # Nested keys become launcher arguments (fsdp_config.x → --fsdp_x), which accelerate sets without checking.
    known = {action.dest for action in launch_command_parser()._actions}
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in raw.get("fsdp_config", {})]
    nested += list(raw.get("deepspeed_config", {}))
    assert not set(nested) - known, f"unknown to accelerate launch: {sorted(set(nested) - known)}"
    assert raw["mixed_precision"] == "no", "precision belongs to the run config (it enters the fingerprints)"

    _, env = _launch(name)
    assert distributed.launch_mode({**env, "WORLD_SIZE": str(raw["num_processes"])}) == EXPECTED[name]


def test_fsdp_config_builds_accelerates_plugin_with_whole_weights_in_saves():
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    _, env = _launch("fsdp-lora")
    # sync_module_states (broadcast rank 0's weights at wrap time) reaches the processes through the launcher's
    # environment. accelerate refuses it where no accelerator exists, so on CPU the flag is checked there and the
    # plugin is built with it off: the environment is the public boundary, nothing inside accelerate is faked.
    assert env["FSDP_SYNC_MODULE_STATES"].lower() == "true"
    if not torch.cuda.is_available():
        env = {**env, "FSDP_SYNC_MODULE_STATES": "false"}
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"] and plugin.use_orig_params is False
    # train_stage merges the adapter that Trainer.save_model writes, which it writes whole only with this type.
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT


@pytest.mark.parametrize(("name", "stage"), [("deepspeed-zero2", 2), ("deepspeed-zero3", 3)])
def test_deepspeed_configs_build_accelerates_plugin_leaving_the_run_settings_to_the_trainer(name, stage):
    from accelerate.utils import DeepSpeedPlugin

    _, env = _launch(name)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    cfg = plugin.deepspeed_config
    assert plugin.zero_stage == cfg["zero_optimization"]["stage"] == stage
    # The Trainer fills these from the run's TrainingArguments.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto", key
    if stage == 3:
        # Trainer.save_model gathers the weights for train_stage's merge only with this on.
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
