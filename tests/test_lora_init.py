"""PiSSA / OLoRA initialisation, the conversion of their adapters, and LoRA+, against HF peft 0.21.

On tiny Llama- and T5-style models: the initial A, B and residual base weight equal peft's; a trained
(here: perturbed) PiSSA / OLoRA adapter saved by peftlab loads in peft on the original, unmodified base
with peftlab's logits; an unconverted peft PiSSA file loads in peftlab; LoRA+ gives B its own rate.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch

from helpers import write_dialogues
from peftlab.cli import main
from peftlab.config import TrainConfig
from peftlab.peft import LoraConfig, adapter_parameters, apply_lora, load_adapter, lora_layers, save_adapter
from peftlab.training.loop import build_optimizer
from test_peft_parity import TASK, TARGETS, load_base, logits, perturb

INITS = ["pissa", "pissa_niter_2", "olora"]


@pytest.fixture(params=["llama", "t5"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def base(kind, tiny_llama_dir, tiny_t5_dir):
    return lambda: load_base(kind, tiny_llama_dir, tiny_t5_dir)


def peft_model(base_model, kind: str, init, rslora: bool = False):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=init,
                             use_rslora=rslora, task_type=TASK[kind])
    return peft.get_peft_model(base_model, config)


@pytest.mark.parametrize("init", INITS)
def test_initial_adapter_and_residual_equal_peft(kind, base, init):
    torch.manual_seed(0)  # pissa_niter_N draws: same seed, same order of layers on both sides
    theirs = peft_model(base(), kind, init)
    torch.manual_seed(0)
    ours = apply_lora(base(), LoraConfig(rank=4, alpha=8, targets=TARGETS[kind], init=init))
    their_params = dict(theirs.named_parameters())
    layers = lora_layers(ours)
    assert len(layers) > 0
    for path, layer in layers.items():
        prefix = f"base_model.model.{path}"
        for name in ("lora_A", "lora_B"):
            expected = their_params[f"{prefix}.{name}.default.weight"]
            assert torch.allclose(getattr(layer, name).weight, expected, atol=1e-5), (path, name)
        residual = their_params[f"{prefix}.base_layer.weight"]
        assert torch.allclose(layer.base_layer.weight, residual, atol=1e-5), path
        assert not torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))  # B starts from W, not 0
    assert (logits(ours, kind) - logits(base(), kind)).abs().max() <= 1e-4  # W_res + s B0 A0 = W: the model unchanged


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_converts_for_the_original_base(kind, base, init, rslora, tmp_path):
    config = LoraConfig(rank=4, alpha=8, targets=TARGETS[kind], init=init, rslora=rslora)
    ours = apply_lora(base(), config).eval()
    perturb(adapter_parameters(ours).values(), seed=3)  # "training"
    save_adapter(ours, tmp_path, config)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(8 * 2 ** 0.5 if rslora else 16)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()  # the original base, untouched
    expected = logits(ours, kind)
    assert (logits(theirs, kind) - expected).abs().max() <= 1e-3  # |logits| ~ 20: float32 rounding of two paths
    assert (logits(load_adapter(base(), tmp_path), kind) - expected).abs().max() <= 1e-3
    # peft's own conversion of the same training gives the same delta (its rank-2r adapter is ours up to order)
    merged_ours = {p: layer.base_layer.weight + layer.delta_weight() for p, layer in lora_layers(ours).items()}
    reloaded = lora_layers(load_adapter(base(), tmp_path))
    for path, layer in reloaded.items():
        assert torch.allclose(layer.base_layer.weight + layer.delta_weight(), merged_ours[path], atol=1e-5)


def test_unconverted_peft_pissa_file_loads(kind, base, tmp_path):
    """peft saves a PiSSA adapter unconverted unless asked; loading redoes the init on the base, as peft does."""
    theirs = peft_model(base(), kind, "pissa")
    perturb((p for n, p in theirs.named_parameters() if "lora_" in n), seed=5)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ours = load_adapter(base(), tmp_path)
    assert (logits(ours, kind) - logits(theirs.eval(), kind)).abs().max() <= 1e-4


def test_dora_and_4bit_refuse_weight_inits():
    with pytest.raises(Exception, match="DoRA does not support"):
        LoraConfig(dora=True, init="pissa")
    with pytest.raises(Exception, match="unknown LoRA init"):
        LoraConfig(init="pissa_niter_x")


def test_loraplus_gives_b_its_own_learning_rate(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", 8)
    config = TrainConfig(model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "r"), method="lora",
                         lr=1e-3, loraplus_ratio=16, weight_decay=0.1)
    model = apply_lora(load_base("llama", tiny_llama_dir, None), LoraConfig(dora=False))
    optim = build_optimizer(config, model, steps=10)
    rates = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optim.optimizer.param_groups:
        for p in group["params"]:
            rates[names[id(p)]] = (group["lr"], group["weight_decay"])
    assert {r for n, r in rates.items() if "lora_A" in n} == {(1e-3, 0.1)}
    assert {(round(lr, 9), decay) for n, (lr, decay) in rates.items() if "lora_B" in n} == {(1.6e-2, 0.1)}
    plain = build_optimizer(TrainConfig(model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "p"),
                                        method="lora", lr=1e-3), model, steps=10)
    assert len(plain.optimizer.param_groups) == 1


def test_train_cli_with_pissa_and_loraplus(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", 24)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--method", "lora",
                 "--init", "pissa", "--loraplus-ratio", "16", "--max-steps", "3", "--batch-size", "4", "--device", "cpu",
                 "--targets", "q_proj,v_proj"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["init"] == "pissa" and info["config"]["loraplus_ratio"] == 16
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["init_lora_weights"] is True  # converted: rank 2 x 8
    theirs = peft.PeftModel.from_pretrained(load_base("llama", tiny_llama_dir, None), out / "final").eval()
    ours = load_adapter(load_base("llama", tiny_llama_dir, None), out / "final")
    assert (logits(ours, "llama") - logits(theirs, "llama")).abs().max() <= 1e-4
    assert (logits(ours, "llama") - logits(load_base("llama", tiny_llama_dir, None), "llama")).abs().max() > 1e-4


def test_server_gives_an_unconverted_pissa_adapter_its_own_residual_model(tiny_llama_dir, tmp_path):
    """A peft PiSSA file expects W_res: the server must not add its A, B to the shared, unmodified W."""
    from peftlab.serve.adapters import AdapterSet
    from peftlab.serve.mixed_lora import RowAdapters

    theirs = peft_model(load_base("llama", tiny_llama_dir, None), "llama", "pissa")
    perturb((p for n, p in theirs.named_parameters() if "lora_" in n), seed=5)
    theirs.save_pretrained(tmp_path / "pissa")
    adapters = AdapterSet(load_base("llama", tiny_llama_dir, None), {"p": tmp_path / "pissa"}, RowAdapters(2, 8),
                          max_adapters=2)
    adapter = adapters.acquire("p")
    assert adapter.kind == "own"
    assert (logits(adapter.model, "llama") - logits(theirs.eval(), "llama")).abs().max() <= 1e-4


def test_weight_inits_refuse_a_tied_weight(tiny_llama_dir):
    model = load_base("llama", tiny_llama_dir, None)
    model.lm_head.weight = model.get_input_embeddings().weight  # tie the head to the embeddings
    with pytest.raises(Exception, match="shared"):
        apply_lora(model, LoraConfig(rank=4, targets=["lm_head"], init="olora"))


def test_a_rebuilt_copy_saves_the_factors_training_started_from(tiny_llama_dir, tmp_path):
    """FSDP's final model is rebuilt on rank 0's CPU: its file must subtract the initial factors of the trained model."""
    from peftlab.training.methods import copy_initial_factors

    config = LoraConfig(rank=4, alpha=8, targets=TARGETS["llama"], init="pissa_niter_1")
    torch.manual_seed(1)
    trained = apply_lora(load_base("llama", tiny_llama_dir, None), config).eval()
    perturb(adapter_parameters(trained).values(), seed=3)
    torch.manual_seed(2)  # another draw of the randomized SVD: other initial factors
    copy = apply_lora(load_base("llama", tiny_llama_dir, None), config).eval()
    with torch.no_grad():
        for key, param in adapter_parameters(copy).items():
            param.copy_(adapter_parameters(trained)[key])
    copy_initial_factors(trained, copy)
    save_adapter(copy, tmp_path, config)
    reloaded = load_adapter(load_base("llama", tiny_llama_dir, None), tmp_path)
    assert (logits(reloaded, "llama") - logits(trained, "llama")).abs().max() <= 1e-3
