"""Fine-tuning methods as the training loop sees them.

A method decides which parameters train (``prepare``) and what ``final/`` holds
(``save_final``): ``full`` trains every weight and saves an HF model folder; every PEFT method
injects its adapter, freezes the rest, and saves a peft-format adapter folder. The loop never
branches on the method. What each method is (family, default learning rate, saved format) lives in
``peftlab.method_table``; adding a method is an entry there and a builder in ``METHODS`` here.

Building a method's own config (``peft.LoraConfig`` ...) needs no model, and its ``__post_init__``
rejects bad settings (``--rank 0``): ``check_options`` runs it before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from peftlab import method_table, peft
from peftlab.errors import UserError
from peftlab.peft.core import ParameterReport, parameter_report  # noqa: F401  (re-exported for the loop)


def lora_config(config) -> peft.LoraConfig:
    targets = config.targets if config.targets is not None else method_table.get(config.method).default_targets
    return peft.LoraConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=targets,
                           exclude=config.exclude or (), layers=config.layers, rslora=config.rslora,
                           dora=config.method == "dora", init=config.init)


def _adapter_config(config) -> peft.BottleneckConfig:
    return peft.BottleneckConfig(reduction_factor=config.reduction_factor, placement=config.adapter_placement)


def _prompt_config(config) -> peft.PromptTuningConfig:
    return peft.PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, prompt_init=config.prompt_init,
                                   prompt_init_text=config.prompt_init_text, tokenizer_name_or_path=config.model)


def _prefix_config(config) -> peft.PrefixConfig:
    return peft.PrefixConfig(num_virtual_tokens=config.num_virtual_tokens)


def _ia3_config(config) -> peft.IA3Config:
    return peft.IA3Config(targets=config.targets, exclude=config.exclude or ())


def _selective_config(config) -> peft.SelectiveConfig:
    return peft.SelectiveConfig(method=config.method, train_modules=config.train_modules,
                                train_layers=config.train_layers)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class Method:
    name: str
    config: Callable[[Any], Any] | None  # TrainConfig -> the method's own config (None: full fine-tuning)
    apply: Callable[..., torch.nn.Module] | None  # (model, method config, loaded, TrainConfig) -> model, only its params trainable

    @property
    def facts(self) -> method_table.MethodFacts:
        return method_table.METHODS[self.name]

    def base_quantization(self, config) -> str | None:
        """How the frozen base is stored: "nf4" (quantised as it loads) or None (as loaded)."""
        if self.facts.quantised_base == "always" or (config.quantize == "nf4" and self.facts.quantised_base == "optional"):
            return "nf4"
        return None

    def prepare(self, loaded, config) -> torch.nn.Module:
        if self.apply is None:
            for p in loaded.model.parameters():
                p.requires_grad_(True)
            return loaded.model
        return self.apply(loaded.model, self.config(config), loaded, config)

    def save_final(self, model, tokenizer, folder: Path, loaded, config) -> None:
        if self.apply is None:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        else:
            peft.save_adapter(model, folder, self.config(config), base_model_name_or_path=loaded.name)


METHODS: dict[str, Method] = {
    "full": Method("full", None, None),
    "lora": Method("lora", lora_config, lambda m, c, loaded, t: peft.apply_lora(m, c)),
    "dora": Method("dora", lora_config, lambda m, c, loaded, t: peft.apply_lora(m, c)),
    "qlora": Method("qlora", lora_config, lambda m, c, loaded, t: peft.apply_qlora(m, c, t.compute_dtype, device=_device(m))),
    "adapter": Method("adapter", _adapter_config, lambda m, c, loaded, t: peft.apply_bottleneck(m, c)),
    "prompt": Method("prompt", _prompt_config, lambda m, c, loaded, t: peft.apply_prompt_tuning(m, c, loaded.tokenizer)),
    "prefix": Method("prefix", _prefix_config, lambda m, c, loaded, t: peft.apply_prefix(m, c)),
    "ia3": Method("ia3", _ia3_config, lambda m, c, loaded, t: peft.apply_ia3(m, c)),
    "bitfit": Method("bitfit", _selective_config, lambda m, c, loaded, t: peft.apply_selective(m, c)),
    "layernorm": Method("layernorm", _selective_config, lambda m, c, loaded, t: peft.apply_selective(m, c)),
    "selective": Method("selective", _selective_config, lambda m, c, loaded, t: peft.apply_selective(m, c)),
}


def get(name: str) -> Method:
    method_table.get(name)  # an unknown name fails with the list of methods
    return METHODS[name]


def check_options(config) -> None:
    """Reject the method's bad settings (``--rank 0``, ``--num-virtual-tokens 0`` ...) before a model loads."""
    method = get(config.method)
    if method.config is not None:
        method.config(config)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights by parameter name: what a checkpoint must hold to resume."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def check_trainable_names(model, weights: dict[str, torch.Tensor]) -> None:
    """A checkpoint's weights are exactly the model's trainable parameters."""
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise UserError(f"checkpoint does not fit this run's model (missing {missing[:3]}, unexpected {extra[:3]}); start a new run")


def load_trainable_state(model, weights: dict[str, torch.Tensor]) -> None:
    check_trainable_names(model, weights)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def copy_initial_factors(source, target) -> None:
    """PiSSA / OLoRA: give ``target``'s layers the initial (A0, B0) of ``source``'s, which its saved adapter subtracts.

    A copy rebuilt elsewhere (FSDP's final model on rank 0's CPU) redoes the SVD / QR, whose randomized variant or
    sign choices may differ from the device's: the file must hold B A - B0 A0 of the factors training started from.
    FSDP shards parameters, not buffers, so ``source`` holds them whole."""
    theirs = peft.lora_layers(source)
    for path, layer in peft.lora_layers(target).items():
        if layer.changes_base and path in theirs:
            layer.lora_A_initial.copy_(theirs[path].lora_A_initial)
            layer.lora_B_initial.copy_(theirs[path].lora_B_initial)


def report_dict(report: ParameterReport) -> dict:
    return {"trainable": report.trainable, "total": report.total, "percent": report.percent, "line": str(report)}
