"""What a soft prompt is close to: the nearest vocabulary tokens of each virtual token.

A trained prompt is a matrix P (N x d) in the model's input-embedding space. Lester et al. 2021
(https://arxiv.org/abs/2104.08691, section 7) read it by listing, for each virtual token, the
vocabulary tokens whose embeddings are nearest by cosine similarity::

    sim(p_i, e_v) = p_i . e_v / (||p_i|| ||e_v||)        e_v: row v of the input embedding matrix

A prompt initialised from a text starts exactly on that text's tokens (similarity 1.0); how far it
drifts during training is one way to see what it learned.

    embeddings = load_prompt_embeddings("runs/x/final")          # (N, d)
    for i, neighbours in enumerate(nearest_tokens(model, tokenizer, embeddings, k=5)):
        print(i, neighbours)                                       # [(" summarize", 0.83), ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import UserError
from peftlab.peft.formats import read_adapter_config, read_adapter_tensors
from peftlab.peft.prompt_tuning import FILE_KEY, soft_prompt


@torch.no_grad()
def nearest_tokens(model: nn.Module, tokenizer: Any, prompt_embeddings: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each row of ``prompt_embeddings`` (N, d): its ``k`` nearest tokens as (text, cosine similarity), best first.

    Only ids the tokenizer knows are candidates (embedding matrices are often padded past the vocabulary).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise UserError(f"k must be a positive integer, got {k!r}")
    table = model.get_input_embeddings().weight.detach()
    table = table[: min(len(tokenizer), table.shape[0])].float()  # (V, d)
    prompt = prompt_embeddings.detach().float().to(table.device)
    if prompt.dim() != 2 or prompt.shape[1] != table.shape[1]:
        raise UserError(
            f"the soft prompt has shape {tuple(prompt.shape)} but the model's embeddings are {table.shape[1]} wide: "
            "was it trained for another base model?"
        )
    sims = F.normalize(prompt, dim=-1) @ F.normalize(table, dim=-1).T  # (N, V)
    values, ids = sims.topk(min(k, table.shape[0]), dim=-1)  # (N, k)
    return [
        [(tokenizer.decode([i]), v) for i, v in zip(row_ids, row_values)]
        for row_ids, row_values in zip(ids.tolist(), values.tolist())
    ]


def prompt_embeddings(model: nn.Module) -> torch.Tensor:
    """The (N, d) soft prompt in use in ``model`` (after ``apply_prompt_tuning`` or ``load_adapter``)."""
    prompt = soft_prompt(model)
    if prompt is None:
        raise UserError("the model has no soft prompt: apply prompt tuning or load a PROMPT_TUNING adapter")
    return prompt.prompt().detach()


def load_prompt_embeddings(adapter_dir: str | Path) -> torch.Tensor:
    """The (N, d) soft prompt of a PROMPT_TUNING adapter folder (peftlab's or peft's), without a model."""
    config = read_adapter_config(adapter_dir)
    if config["peft_type"] != "PROMPT_TUNING":
        raise UserError(f"{adapter_dir} holds a {config['peft_type']} adapter, not a soft prompt (PROMPT_TUNING)")
    tensors = read_adapter_tensors(adapter_dir)
    if FILE_KEY not in tensors:
        raise UserError(f"{adapter_dir} has no {FILE_KEY} tensor: re-save the adapter")
    return tensors[FILE_KEY][: config["num_virtual_tokens"]]  # peft's seq2seq files hold unused extra rows
