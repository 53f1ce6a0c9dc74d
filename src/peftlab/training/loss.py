"""Cross-entropy on completion tokens only, computing logits only where they are needed.

For a decoder-only model the logits at position t predict token t+1, so the loss compares
``logits[:, :-1]`` with ``labels[:, 1:]``. Only positions whose label is not -100 (the
completion) count; for those we apply the output head to their hidden states alone, instead of
building the full (B, T, vocab) logits tensor: with SmolLM2's 49,152-token vocabulary that tensor
dominates memory and costs a fifth of the compute. Models whose head does more than a linear
map (logit soft-capping or scaling) fall back to the model's own logits.

Even the completion positions' logits are never held whole: ``linear_cross_entropy`` takes
``CHUNK`` positions at a time and computes their gradients in the same pass (Liger-kernel's fused
linear cross-entropy, in plain PyTorch), so no (N, vocab) logits or logit gradient outlive a chunk.

A batch is padded (``input_ids``, ``attention_mask``) or packed (one row of examples end to end
with ``position_ids`` and ``cu_seq_lens``, see ``peftlab.training.packing``); the loss is the same.

The function returns the *sum* of token losses and the token count, so gradient accumulation
can divide by the number of completion tokens of the whole optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftlab.data.encode import IGNORE_INDEX

CHUNK = 512  # completion positions per chunk: (512, 49,152) float32 logits are 100 MB


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


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What a decoder reads from a batch: padded (ids, attention mask) or packed (ids, restarting positions
    and the examples' boundaries, which transformers hands to the attention function). No key/value cache:
    training never reuses one (and with one, transformers would not see that a row is packed)."""
    if "cu_seq_lens" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    bounds = batch["cu_seq_lens"]
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest, "use_cache": False}


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(W h_i + b, y_i) over chunks of rows, its gradients computed in the forward pass.

    For logits z = W h + b: dCE/dz = softmax(z) - onehot(y); dh = (dz) W, dW = (dz)^T h, db = sum dz.
    The backward pass only scales them by the incoming scalar gradient (1 / completion tokens).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, grad_enabled):  # hidden (N, d), weight (V, d), targets (N,)
        need_h, need_w, need_b = ctx.needs_input_grad[:3] if grad_enabled else (False,) * 3  # forward runs in no_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            for a in range(0, hidden.shape[0], chunk):
                h, y = hidden[a : a + chunk].to(weight.dtype), targets[a : a + chunk]
                logits = F.linear(h, weight, bias).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                dz = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                dz[torch.arange(len(y), device=y.device), y] -= 1.0
                if need_b:
                    grad_b += dz.sum(0)
                dz = dz.to(weight.dtype)
                if need_h:
                    grad_h[a : a + chunk] = (dz @ weight).to(hidden.dtype)  # (n, d)
                if need_w:
                    grad_w += (dz.t() @ h).float()  # (V, d)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(weight_dtype),
                None if grad_b is None else (grad_b * grad_out).to(bias_dtype), None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` (N, V) against ``targets`` (N,), ``chunk`` rows at a time."""
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, torch.is_grad_enabled())


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
        hidden = model.base_model(**model_inputs(batch)).last_hidden_state  # (B, T, d)
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX
        targets = targets[keep]  # (N,)
        return linear_cross_entropy(hidden[:, :-1][keep], model.get_output_embeddings(), targets), len(targets)
    else:
        logits = model(**model_inputs(batch)).logits[:, :-1]
        targets = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


class CompletionLoss(torch.nn.Module):
    """``completion_loss`` as a module: ``forward(batch) -> (summed loss, completion tokens)``.

    The training step calls the model through this, so that a wrapper around it (DDP, FSDP2's root
    unit) sees the whole computation, the output head applied apart included: DDP's gradient hooks and
    FSDP's gathering of the root's parameters (embeddings, final norm, head) run on each call. Alone
    it adds nothing, parameter names gain the prefix ``model.``.
    """

    PREFIX = "model."

    def __init__(self, model: torch.nn.Module, is_seq2seq: bool) -> None:
        super().__init__()
        self.model = model
        self.is_seq2seq = is_seq2seq

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return completion_loss(self.model, batch, self.is_seq2seq)
