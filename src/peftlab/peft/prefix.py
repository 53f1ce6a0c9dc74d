"""Prefix tuning: trainable keys and values in front of every attention layer of a frozen decoder.

Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190) prepends P virtual positions to
the keys and values of every attention layer; every real token attends to them, nothing else
changes. Per layer l and key/value head h the prefix is a (P, head_dim) block; all of them together
form one (P, L * 2 * kv_heads * head_dim) matrix, laid out as HF peft's ``prompt_embeddings``::

    prefix[p] = [layer 0: keys (heads x head_dim), values; layer 1: keys, values; ...]

Optimising that matrix directly is unstable, so during training it is reparameterised (paper,
section 4.3) through an MLP from a smaller (P, d_model) embedding P'::

    prefix = W2 tanh(W1 P' + b1) + b2        W1: (hidden, d_model), W2: (L * 2 * kv_dim, hidden)

The MLP is only a training device: the adapter file holds the computed prefix (folded at save,
``prefix_projection: false``), which loads as plain trainable tensors with no MLP.

How it is injected (decoder-only models). A forward pre-hook on ``model.base_model`` fills an empty
KV cache (HF transformers' ``DynamicCache``, created when the caller passes none) with the prefix
keys and values, puts P ones in front of the attention mask and sets the position ids from that
mask, so the real tokens sit at positions P, P+1, ... (as in HF peft) whatever the padding. During
``generate`` the cache keeps the prefix from the first step on; later steps only get the mask
extended. Hidden states and logits line up with ``input_ids`` as without a prefix.

    model = apply_prefix(model, PrefixConfig(num_virtual_tokens=20))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.core import freeze_all_but_adapters
from peftlab.peft.formats import AdapterFormat, register_format, rename_key
from peftlab.peft.prompt_tuning import (
    FILE_KEY,
    cache_argument,
    cache_length,
    call_kwargs,
    check_context,
    extend_mask,
    pop_cache,
    position_ids,
)

MODULE_NAME = "prefix_encoder"


@dataclass
class PrefixConfig:
    """How to add trainable attention prefixes to a decoder-only model."""

    num_virtual_tokens: int = 20
    """P, the number of prefix positions in front of every layer's keys and values."""
    projection: bool = True
    """Reparameterise the prefix through an MLP while training (Li & Liang); False trains it directly."""
    projection_hidden: int = 512
    """Hidden width of the reparameterising MLP (the paper's 512)."""

    def __post_init__(self) -> None:
        for name, example in (("num_virtual_tokens", "--prefix-tokens 20"), ("projection_hidden", "--prefix-hidden 512")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}: use e.g. {example}")


@dataclass(frozen=True)
class KVShape:
    """The cache geometry of a decoder: layers, key/value heads and head size."""

    layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Numbers per prefix position: L * 2 * heads * head_dim."""
        return self.layers * 2 * self.heads * self.head_dim

    @classmethod
    def of(cls, config: Any) -> KVShape:
        heads = getattr(config, "num_attention_heads", None)
        layers = getattr(config, "num_hidden_layers", None)
        if heads is None or layers is None or getattr(config, "layer_types", None) and len(set(config.layer_types)) > 1:
            raise UserError(f"prefix tuning needs a decoder with uniform attention layers; {config.model_type} is not one")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


class PrefixEncoder(nn.Module):
    """The prefix (through its MLP while ``projection``) and the hook that puts it in the KV cache."""

    adds_virtual_tokens = True

    def __init__(self, num_virtual_tokens: int, shape: KVShape, model_dim: int, projection: bool,
                 projection_hidden: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens, self.shape, self.projection = num_virtual_tokens, shape, projection
        if projection:
            self.embedding = nn.Embedding(num_virtual_tokens, model_dim, device=device)  # P': (P, d_model)
            self.transform = nn.Sequential(
                nn.Linear(model_dim, projection_hidden, device=device),
                nn.Tanh(),
                nn.Linear(projection_hidden, shape.width, device=device),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, shape.width, device=device)  # the prefix itself

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def prefix(self) -> torch.Tensor:
        """(P, L * 2 * kv_heads * head_dim), in peft's layout."""
        weight = self.embedding.weight
        return self.transform(weight) if self.projection else weight

    def attach(self, model: nn.Module) -> None:
        model.base_model.register_forward_pre_hook(self._fill_cache, with_kwargs=True)

    def _fill_cache(self, stack: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        from transformers import DynamicCache

        kw = call_kwargs(stack, args, kwargs)
        p, shape = self.num_virtual_tokens, self.shape
        tokens = kw["input_ids"] if kw.get("inputs_embeds") is None else kw["inputs_embeds"]
        batch, length = tokens.shape[:2]
        cache = pop_cache(kw)
        if cache_length(cache) == 0:
            if getattr(stack, "gradient_checkpointing", False) and stack.training:
                raise UserError("prefix tuning does not work with gradient checkpointing (layers would fill the cache twice)")
            cache = DynamicCache(config=stack.config) if cache is None else cache
            dtype = stack.get_input_embeddings().weight.dtype
            kv = self.prefix().to(dtype).view(p, shape.layers, 2, shape.heads, shape.head_dim)
            kv = kv.permute(1, 2, 3, 0, 4)  # (L, 2, heads, P, head_dim)
            for layer in range(shape.layers):
                keys = kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, heads, P, head_dim)
                values = kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)
                cache.update(keys, values, layer)
        past = cache_length(cache)
        check_context(stack.config, past + length, p, "prefix")
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), p)
        kw["position_ids"] = position_ids(kw["attention_mask"], past, length, tokens.device)
        kw[cache_argument(stack)] = cache
        return (), kw

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, {self.shape}, projection={self.projection}"


def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    module = getattr(model, MODULE_NAME, None)
    return module if isinstance(module, PrefixEncoder) else None


def apply_prefix(model: nn.Module, config: PrefixConfig) -> nn.Module:
    """Attach trainable prefixes to every attention layer of a decoder-only ``model``; freeze the rest; in place."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError("prefix tuning supports decoder-only models; for T5-style models use --method prompt, ia3 or lora")
    if model.base_model is model:
        raise UserError(f"{type(model).__name__} has no separate decoder stack (model.base_model) to put prefixes in")
    if prefix_encoder(model) is not None:
        raise UserError("the model already has prefixes: load the base model again to add others")
    table = model.get_input_embeddings().weight
    encoder = PrefixEncoder(config.num_virtual_tokens, KVShape.of(model.config), table.shape[1], config.projection,
                            config.projection_hidden, device=table.device)
    encoder.train(model.training)
    model.add_module(MODULE_NAME, encoder)
    encoder.attach(model)
    freeze_all_but_adapters(model)
    return model


# ---------------------------------------------------------------------------------------------
# peft's format (peft_type "PREFIX_TUNING"): ``prompt_embeddings`` (P, L * 2 * kv_dim), the folded prefix


_MODEL_KEY = f"{MODULE_NAME}.embedding.weight"  # where a plain (MLP-less) prefix keeps its tensor


def folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What to save: the prefix computed through the MLP, under the key a plain (MLP-less) prefix has."""
    encoder = prefix_encoder(model)
    if encoder is None:
        raise UserError("the model has no prefixes to save: apply or load them first")
    with torch.no_grad():
        return {_MODEL_KEY: encoder.prefix().detach().float()}


def prefix_config_from_json(data: dict[str, Any]) -> PrefixConfig:
    if "num_virtual_tokens" not in data:
        raise UserError("this prefix-tuning adapter config has no num_virtual_tokens: re-save the adapter")
    if (data.get("num_transformer_submodules") or 1) != 1 or data.get("task_type") == "SEQ_2_SEQ_LM":
        raise UserError("this prefix-tuning adapter is for an encoder-decoder model; peftlab's prefixes are decoder-only")
    if data.get("modules_to_save"):
        raise UserError(f"this prefix-tuning adapter also trains modules_to_save={data['modules_to_save']!r}, "
                        "which peftlab does not support")
    # The file holds the prefix itself (peft also saves it folded when prefix_projection is true).
    return PrefixConfig(num_virtual_tokens=data["num_virtual_tokens"], projection=False)


def prefix_config_to_json(config: PrefixConfig, model: nn.Module) -> dict[str, Any]:
    shape = KVShape.of(model.config)
    return {
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": shape.heads * shape.head_dim,  # peft's token_dim for prefixes: the key/value width
        "num_attention_heads": shape.heads,
        "num_layers": shape.layers,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": config.projection_hidden,
        "prefix_projection": False,  # the saved tensor is the prefix itself
        "modules_to_save": None,
    }


register_format(
    "PREFIX_TUNING",
    AdapterFormat(
        config_type=PrefixConfig,
        config_from_json=prefix_config_from_json,
        config_to_json=prefix_config_to_json,
        apply=apply_prefix,
        to_file_key=rename_key(_MODEL_KEY, FILE_KEY),
        from_file_key=rename_key(FILE_KEY, _MODEL_KEY),
        state_dict=folded_state_dict,
    ),
)
