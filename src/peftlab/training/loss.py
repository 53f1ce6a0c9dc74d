"""Cross-entropy on completion tokens only, computing logits only where they are needed.

For a decoder-only model the logits at position t predict token t+1, so the loss compares
``logits[:, :-1]`` with ``labels[:, 1:]``. Only positions whose label is not -100 (the
completion) count; for those we apply the output head to their hidden states alone, instead of
building the full (B, T, vocab) logits tensor: with SmolLM2's 49,152-token vocabulary that tensor
dominates memory and costs a fifth of the compute. Models whose head does more than a linear
map (logit soft-capping or scaling) fall back to the model's own logits.

The function returns the *sum* of token losses and the token count, so gradient accumulation
can divide by the number of completion tokens of the whole optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftlab.data.encode import IGNORE_INDEX


def plain_linear_head(model) -> bool:
    """Whether the model's logits are just its output Linear applied to the last hidden state."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    head = model.get_output_embeddings()
    return isinstance(head, torch.nn.Linear) and hasattr(model, "base_model") and model.base_model is not model


def target_count(labels: torch.Tensor, is_seq2seq: bool) -> int:
    """Completion tokens that enter the loss of a batch (decoder-only: the first position predicts nothing)."""
    targets = labels if is_seq2seq else labels[:, 1:]
    return int((targets != IGNORE_INDEX).sum())


def completion_loss(model, batch: dict[str, torch.Tensor], is_seq2seq: bool) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over completion tokens, number of completion tokens)."""
    labels = batch["labels"]
    if is_seq2seq:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids
        ).logits  # (B, T_target, V)
        targets = labels
    elif plain_linear_head(model):
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V): completion positions only
        targets = targets[keep]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())
