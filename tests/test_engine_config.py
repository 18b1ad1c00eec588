"""The DeepSpeed JSON as the engine receives it: flags fill it in, contradictions are one line."""
import json

import pytest

from megatron_sp.arguments import parse_args
from megatron_sp.errors import ConfigError
from megatron_sp.validation import validate
from megatron_sp.training.engine import deepspeed_config

BASE = ["--mock-data", "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "8"]


def config(tmp_path, json_body: dict | None, *flags, world=4, sp=1):
    argv = [*BASE, *flags, "--sequence-parallel-size", str(sp)]
    if json_body is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(json_body))
        argv += ["--deepspeed_config", str(path)]
    cfg = parse_args(argv)
    validate(cfg, world)
    return deepspeed_config(cfg, world // sp)


def test_flags_fill_in_batch_precision_clipping_and_zero(tmp_path):
    ds, notes = config(tmp_path, None, "--zero-stage", "2", "--bf16", "--clip-grad", "0.5", world=4, sp=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2  # 8 / (micro 2 x DP 2)
    assert ds["train_batch_size"] == 8 * 2  # DeepSpeed counts each SP rank as data-parallel
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.5 and notes == []
    assert ds["timers"] == {"throughput": {"enabled": False}}  # no device sync as each step starts and ends


def test_deepspeeds_throughput_timer_runs_only_when_the_json_asks(tmp_path):
    from deepspeed.utils.config import get_timers_config  # what DeepSpeed's engine reads
    ds, _ = config(tmp_path, None)
    assert not get_timers_config(ds).enabled
    ds, _ = config(tmp_path, {"timers": {"throughput": {"enabled": True}}})
    assert get_timers_config(ds).enabled and get_timers_config(ds).synchronized


def test_megatron_template_values_are_kept_and_checked(tmp_path):
    body = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1,
            "reduce_bucket_size": 5e7}, "optimizer": {"type": "Adam"}, "fp16": {"enabled": True}}
    ds, notes = config(tmp_path, body, "--zero-stage", "3")
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 5e7}  # the flag wins, the rest stays
    assert "optimizer" not in ds and "fp16" not in ds
    assert any("optimizer section" in n for n in notes) and any("fp16 is enabled" in n for n in notes)


def test_contradicting_batch_size_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, {"train_batch_size": 16})
    assert "train_batch_size = 16 contradicts the flags" in str(err.value) and "\n" not in str(err.value)


def test_bad_json_is_one_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    cfg = parse_args([*BASE, "--deepspeed_config", str(path)])
    validate(cfg, 4)
    with pytest.raises(ConfigError, match="is not valid JSON"):
        deepspeed_config(cfg, 4)


def test_fp16_section_carries_the_loss_scaling_flags(tmp_path):
    cfg = parse_args([*BASE, "--fp16", "--initial-loss-scale", "65536", "--hysteresis", "3", "--loss-scale-window", "500"])
    cfg.training.global_batch_size = 8  # validate() refuses --fp16 without a GPU; the JSON is still defined
    ds, _ = deepspeed_config(cfg, 4)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 500,
                          "hysteresis": 3, "min_loss_scale": 1.0}
