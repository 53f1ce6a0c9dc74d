"""Configs: a method's own settings fail before any model loads; shared options are declared once."""

from __future__ import annotations

import dataclasses

import pytest

import peftlab
from peftlab import models
from peftlab.cli import COMMANDS
from peftlab.config import CompareConfig, DemoConfig, TrainConfig
from peftlab.errors import UserError
from peftlab.training import loop
from helpers import expect_error

BAD_METHOD_OPTIONS = [
    (["--method", "lora", "--rank", "0"], "LoRA rank must be a positive integer"),
    (["--method", "dora", "--alpha", "-1"], "LoRA alpha must be positive"),
    (["--method", "qlora", "--dropout", "1"], "LoRA dropout must be in [0, 1)"),
    (["--method", "prompt", "--num-virtual-tokens", "0"], "num_virtual_tokens must be a positive integer"),
    (["--method", "prefix", "--num-virtual-tokens", "0"], "num_virtual_tokens must be a positive integer"),
    (["--method", "adapter", "--reduction-factor", "0"], "reduction_factor must be a positive integer"),
    (["--method", "selective"], "--method selective needs --train-modules"),
    (["--method", "bitfit", "--train-modules", "q_proj"], "--train-modules is for --method selective"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the method's options were checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(loop, "load_model", refuse, raising=False)


@pytest.mark.parametrize("options,message", BAD_METHOD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_METHOD_OPTIONS])
def test_bad_method_options_fail_before_the_model_loads(options, message, no_model_loads, tmp_path, capsys):
    # neither the model nor the data exists: only the options are looked at
    args = ["train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"),
            "--out", str(tmp_path / "o")]
    assert message in expect_error(args + options, capsys)
    assert not (tmp_path / "o").exists()


def test_the_python_api_checks_them_as_early(no_model_loads, tmp_path):
    with pytest.raises(UserError, match="LoRA rank must be a positive integer, got 0"):
        peftlab.train(model="m", data="d.jsonl", out=str(tmp_path / "o"), method="lora", rank=0)


def test_learning_rate_is_the_methods_unless_given():
    assert TrainConfig(model="m", data="d", out="o").learning_rate == 5e-5
    assert TrainConfig(model="m", data="d", out="o", method="prompt").learning_rate == 3e-2
    assert TrainConfig(model="m", data="d", out="o", method="prompt", lr=1e-4).learning_rate == 1e-4


def test_shared_options_say_the_same_in_every_command():
    for name in ("device", "dtype", "chat_template", "trust_pickle", "quantize"):
        fields = [f for cls, _ in COMMANDS.values() for f in dataclasses.fields(cls) if f.name == name]
        assert len(fields) >= 3 and len({(f.default, f.metadata["choices"]) for f in fields}) == 1, name
    devices = {f.metadata["help"] for cls, _ in COMMANDS.values() for f in dataclasses.fields(cls) if f.name == "device"}
    assert devices == {"cpu, cuda, cuda:N or auto (cuda when available)."}


def test_demo_is_a_compare_with_its_own_limits():
    demo = DemoConfig(out="runs/d", methods="base,lora", train_examples=10, test_examples=3, max_steps=2, device="cpu")
    assert demo.compare_config() == CompareConfig(model=demo.model, data=demo.data, out="runs/d", methods="base,lora",
                                                  train_limit=10, test_limit=3, max_steps=2, batch_size=demo.batch_size,
                                                  max_new_tokens=demo.max_new_tokens, seed=demo.seed, latency_examples=0,
                                                  device="cpu")
