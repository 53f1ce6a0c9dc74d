"""Prompt tuning: N trainable virtual-token embeddings prepended to the input of a frozen model.

Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691) keeps every weight of the
model frozen and learns only a soft prompt P (N x d) that is put in front of the embedded input::

    h = Model([P; E x])          E: the frozen input embeddings (V x d), x: the input tokens

With N = 20 on SmolLM2-135M (d = 576) that is 11,520 trained numbers. The prompt starts as
uniform noise in [-0.5, 0.5] (the paper's random initialisation), as the embeddings of tokens drawn
from the vocabulary (``vocab``, HF peft's SAMPLE_VOCAB), or as the embeddings of a text repeated or
cut to N tokens (``text``, the paper's best initialisation for small models; peft's TEXT).

How it is injected. The model is not wrapped: forward hooks on the stack that embeds the input
(``model.base_model`` for decoder-only models, the encoder for seq2seq ones) prepend P to the
embedded input and N ones to the attention mask, so every caller (the loss, ``generate``, a plain
``model(...)``) sees the prompt. For decoder-only models the hooks also

- set the position ids from the extended mask: the virtual tokens take positions 0..N-1 and the
  real tokens N, N+1, ... whatever the padding (left padding for generation, right for training);
- remove the N virtual positions from the stack's output again, so hidden states and logits line
  up with ``input_ids`` and labels as without a prompt (HF peft returns them; compare at [:, N:]);
- prepend the prompt only when the KV cache is empty: later ``generate`` steps find the prompt's
  keys and values in the cache and only get N ones in front of their attention mask.

For seq2seq models the encoder output keeps the virtual positions (the decoder attends to them)
and a hook on the decoder extends the encoder attention mask it receives.

    model = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=20, prompt_init="text",
                                                          prompt_init_text="Summarize the dialogue:"), tokenizer)

A prompt plus an input longer than the model's context raises a :class:`UserError` at the forward
that would overflow (``virtual_token_count(model)`` says how many positions to reserve).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.core import freeze_all_but_adapters
from peftlab.peft.formats import AdapterFormat, register_format, rename_key

PROMPT_INITS = ("random", "vocab", "text")
PEFT_INIT_NAMES = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
MODULE_NAME = "prompt_encoder"  # the soft prompt's attribute on the model (peft's name too)
FILE_KEY = "prompt_embeddings"  # peft's key for the prompt in adapter_model.safetensors


@dataclass
class PromptTuningConfig:
    """How to add a trainable soft prompt to a model."""

    num_virtual_tokens: int = 20
    """N, the number of virtual tokens prepended to every input."""
    prompt_init: str = "random"
    """random (uniform in [-0.5, 0.5]), vocab (embeddings of random vocabulary tokens) or text."""
    prompt_init_text: str | None = None
    """With ``prompt_init="text"``: the text whose token embeddings start the prompt (repeated or cut to N)."""
    tokenizer_name_or_path: str | None = None
    """Recorded in adapter_config.json for peft's TEXT init (default: the model's name_or_path); with
    ``prompt_init="text"`` and no tokenizer passed to :func:`apply_prompt_tuning`, loaded from here."""
    num_transformer_submodules: int = 1
    """peft's field: 2 doubles the prompt rows for seq2seq models (peft's default for T5), of which
    only the first N are used (by peft too); 1 everywhere else. Set from adapter files."""

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise UserError(f"num_virtual_tokens must be a positive integer, got {n!r}: use e.g. --num-virtual-tokens 20")
        if self.prompt_init not in PROMPT_INITS:
            raise UserError(f"prompt_init must be one of {', '.join(PROMPT_INITS)}, not {self.prompt_init!r}")
        if self.prompt_init == "text" and not self.prompt_init_text:
            raise UserError("--prompt-init text needs --prompt-init-text: the words to start the prompt from")
        if self.prompt_init != "text" and self.prompt_init_text:
            raise UserError(f"--prompt-init-text is only used with --prompt-init text (not {self.prompt_init})")
        if self.num_transformer_submodules not in (1, 2):
            raise UserError(f"num_transformer_submodules must be 1 or 2, got {self.num_transformer_submodules!r}")


# ---------------------------------------------------------------------------------------------
# Virtual positions: shared with prefix tuning


def call_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward call's arguments as keywords (positional ones named from ``module.forward``'s signature)."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(module.forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache of a call, removed from ``kwargs``: HF transformers 5 names it ``cache`` (``past_key_values`` before)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def cache_argument(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes the KV cache."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_length(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """(B, T) -> (B, n + T): ``n`` attended positions in front; None stays None."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise UserError("soft prompts and prefixes need a 2D (batch, tokens) attention mask, not a prepared 4D one")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def position_ids(mask: torch.Tensor | None, past: int, length: int, device: torch.device) -> torch.Tensor:
    """Positions of the ``length`` tokens of this call, counted over the attended tokens only.

    ``mask`` covers the cache and this call, (B, past + length); without one, positions continue the cache.
    """
    if mask is None:
        return torch.arange(past, past + length, device=device).unsqueeze(0)  # (1, length)
    if mask.shape[1] != past + length:
        raise UserError(
            f"the attention mask covers {mask.shape[1]} positions but the cache and the input hold {past + length}: "
            "pass the mask of the real tokens (the virtual ones are added by peftlab)"
        )
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]  # (B, length)


def check_context(config: Any, total: int, virtual: int, kind: str) -> None:
    """Raise if ``total`` positions (``virtual`` of them added by the method) exceed the model's context."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or total <= limit:
        return
    raise UserError(
        f"the {kind} ({virtual} virtual tokens) plus the input ({total - virtual} tokens) need {total} positions, "
        f"{total - limit} more than the model's context of {limit}: shorten the input to {max(limit - virtual, 1)} "
        "tokens or less (prompt and generated tokens together) or use fewer virtual tokens"
    )


# ---------------------------------------------------------------------------------------------
# The soft prompt


class SoftPrompt(nn.Module):
    """The prompt P (``embedding.weight``: (N * submodules, d), float32) and the hooks that prepend it."""

    adds_virtual_tokens = True

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_transformer_submodules: int = 1,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens * num_transformer_submodules, token_dim, device=device)
        self.causal = True  # decoder-only: positions, cache and output trimming are ours to handle
        self._prepended = False

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"embedding.weight": self.embedding.weight}

    def prompt(self) -> torch.Tensor:
        """(N, d): the rows in use (the first N, as in peft when there are two submodules' worth)."""
        return self.embedding.weight[: self.num_virtual_tokens]

    def attach(self, model: nn.Module) -> None:
        """Install the hooks on ``model``'s input stack (and its decoder, for seq2seq models)."""
        if model.config.is_encoder_decoder:
            self.causal = False
            stack = model.get_encoder()
            model.get_decoder().register_forward_pre_hook(self._extend_encoder_mask, with_kwargs=True)
        else:
            stack = model.base_model
            if stack is model:
                raise UserError(f"{type(model).__name__} has no separate decoder stack (model.base_model) for a soft prompt")
            stack.register_forward_hook(self._trim, with_kwargs=True)
        stack.register_forward_pre_hook(self._prepend, with_kwargs=True)

    def _prepend(self, stack: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kw = call_kwargs(stack, args, kwargs)
        n = self.num_virtual_tokens
        cache = pop_cache(kw)
        past = cache_length(cache)
        embeds = kw.get("inputs_embeds")
        length = (kw["input_ids"] if embeds is None else embeds).shape[1]
        self._prepended = past == 0  # later generation steps find the prompt in the cache
        if self._prepended:
            if embeds is None:
                embeds = stack.get_input_embeddings()(kw["input_ids"])  # (B, T, d)
            prompt = self.prompt().to(embeds.dtype).expand(embeds.shape[0], -1, -1)  # (B, N, d)
            kw["inputs_embeds"], kw["input_ids"] = torch.cat([prompt, embeds], dim=1), None  # (B, N + T, d)
            length += n
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n)
        if self.causal:
            check_context(stack.config, past + length, n, "soft prompt")
            tokens = kw["input_ids"] if kw.get("inputs_embeds") is None else kw["inputs_embeds"]
            kw["position_ids"] = position_ids(kw["attention_mask"], past, length, tokens.device)
            if cache is not None:
                kw[cache_argument(stack)] = cache
        return (), kw

    def _trim(self, stack: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Drop the virtual positions from the decoder stack's output (its first element: the hidden states)."""
        if not self._prepended:
            return output
        self._prepended = False
        n = self.num_virtual_tokens
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, n:]  # (B, T, d)
        return output

    def _extend_encoder_mask(self, decoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kw = call_kwargs(decoder, args, kwargs)
        hidden, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
        if hidden is not None and mask is not None and mask.dim() == 2 and mask.shape[1] + self.num_virtual_tokens == hidden.shape[1]:
            kw["encoder_attention_mask"] = extend_mask(mask, self.num_virtual_tokens)
        return (), kw

    def extra_repr(self) -> str:
        rows, dim = self.embedding.weight.shape
        return f"num_virtual_tokens={self.num_virtual_tokens}, rows={rows}, token_dim={dim}"


def soft_prompt(model: nn.Module) -> SoftPrompt | None:
    module = getattr(model, MODULE_NAME, None)
    return module if isinstance(module, SoftPrompt) else None


def virtual_token_count(model: nn.Module) -> int:
    """Positions a soft prompt or a prefix adds in front of every input (0 without either).

    Generation and encoding can reserve them: the input may hold ``context - virtual_token_count(model)`` tokens.
    """
    return sum(m.num_virtual_tokens for m in model.children() if getattr(m, "adds_virtual_tokens", False))


@torch.no_grad()
def initial_prompt(model: nn.Module, config: PromptTuningConfig, rows: int, tokenizer: Any = None) -> torch.Tensor:
    """(rows, d) float32 starting values of the prompt, as ``config.prompt_init`` says."""
    table = model.get_input_embeddings().weight  # (V, d)
    if config.prompt_init == "random":
        return torch.empty(rows, table.shape[1], device=table.device).uniform_(-0.5, 0.5)
    if config.prompt_init == "vocab":
        vocab = min(len(tokenizer), table.shape[0]) if tokenizer is not None else table.shape[0]
        ids = torch.randint(0, vocab, (rows,), device=table.device)
    else:
        if tokenizer is None and config.tokenizer_name_or_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
        if tokenizer is None:
            raise UserError("--prompt-init text needs the model's tokenizer: pass tokenizer= to apply_prompt_tuning")
        text_ids = tokenizer(config.prompt_init_text, add_special_tokens=False)["input_ids"]
        if not text_ids:
            raise UserError(f"--prompt-init-text {config.prompt_init_text!r} has no tokens: give some words")
        text_ids = (text_ids * math.ceil(rows / len(text_ids)))[:rows]  # repeated or cut to the rows, as peft
        ids = torch.tensor(text_ids, device=table.device)
    return table[ids].float().clone()  # (rows, d)


def apply_prompt_tuning(model: nn.Module, config: PromptTuningConfig, tokenizer: Any = None) -> nn.Module:
    """Attach a soft prompt to ``model`` (as ``model.prompt_encoder``) and freeze everything else; in place.

    ``tokenizer`` is needed for ``prompt_init="text"`` (and bounds ``vocab`` sampling to real tokens).
    """
    if soft_prompt(model) is not None:
        raise UserError("the model already has a soft prompt: load the base model again to add another")
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if config.num_transformer_submodules == 2 and not is_seq2seq:
        raise UserError("num_transformer_submodules=2 is for encoder-decoder models; this one is decoder-only")
    table = model.get_input_embeddings().weight
    rows = config.num_virtual_tokens * config.num_transformer_submodules
    prompt = SoftPrompt(config.num_virtual_tokens, table.shape[1], config.num_transformer_submodules, device=table.device)
    with torch.no_grad():
        prompt.embedding.weight.copy_(initial_prompt(model, config, rows, tokenizer))
    prompt.train(model.training)
    model.add_module(MODULE_NAME, prompt)
    prompt.attach(model)
    freeze_all_but_adapters(model)
    return model


# ---------------------------------------------------------------------------------------------
# peft's format (peft_type "PROMPT_TUNING"): one tensor, ``prompt_embeddings`` (N * submodules, d)


def prompt_config_from_json(data: dict[str, Any]) -> PromptTuningConfig:
    if "num_virtual_tokens" not in data:
        raise UserError("this prompt-tuning adapter config has no num_virtual_tokens: re-save the adapter")
    if data.get("modules_to_save"):
        raise UserError(f"this prompt-tuning adapter also trains modules_to_save={data['modules_to_save']!r}, "
                        "which peftlab does not support")
    submodules = data.get("num_transformer_submodules") or (2 if data.get("task_type") == "SEQ_2_SEQ_LM" else 1)
    # The init does not matter when loading: the saved prompt replaces it.
    return PromptTuningConfig(num_virtual_tokens=data["num_virtual_tokens"], num_transformer_submodules=submodules,
                              tokenizer_name_or_path=data.get("tokenizer_name_or_path"))


def prompt_config_to_json(config: PromptTuningConfig, model: nn.Module) -> dict[str, Any]:
    model_config = model.config
    init = PEFT_INIT_NAMES[config.prompt_init]
    tokenizer_path = config.tokenizer_name_or_path or getattr(model, "name_or_path", None) or None
    if init == "TEXT" and tokenizer_path is None:
        init = "RANDOM"  # peft refuses TEXT without a tokenizer path; the init no longer matters once trained
    return {
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": model.get_input_embeddings().weight.shape[1],
        "num_transformer_submodules": config.num_transformer_submodules,
        "num_attention_heads": getattr(model_config, "num_attention_heads", getattr(model_config, "num_heads", None)),
        "num_layers": getattr(model_config, "num_hidden_layers", getattr(model_config, "num_layers", None)),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": config.prompt_init_text,
        "tokenizer_name_or_path": tokenizer_path,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
    }


_MODEL_KEY = f"{MODULE_NAME}.embedding.weight"

register_format(
    "PROMPT_TUNING",
    AdapterFormat(
        config_type=PromptTuningConfig,
        config_from_json=prompt_config_from_json,
        config_to_json=prompt_config_to_json,
        apply=apply_prompt_tuning,
        to_file_key=rename_key(_MODEL_KEY, FILE_KEY),
        from_file_key=rename_key(FILE_KEY, _MODEL_KEY),
    ),
)
