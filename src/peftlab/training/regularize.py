"""Keep a fine-tuned model close to what it knew: L2-SP and EWC penalties toward the pre-trained weights.

    regularizer = make_regularizer("ewc", model, lam=100.0, fisher_batches=keep_batches)
    ...
    loss = loss + regularizer.penalty(model)   # once per optimizer step, before backward

With theta the trainable parameters and theta0 their values when the regulariser is made (the
pre-trained weights, before the first step):

L2-SP (Li, Grandvalet and Davoine 2018, "Explicit inductive bias for transfer learning with
convolutional networks") pulls every weight toward its starting point rather than toward 0::

    Omega(theta) = lam * sum_i (theta_i - theta0_i)^2          grad = 2 lam (theta - theta0)

EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks") weights
each coordinate by how much the tasks to keep depend on it, the diagonal of the Fisher
information at theta0::

    Omega(theta) = lam * sum_i F_i (theta_i - theta0_i)^2      grad = 2 lam F (theta - theta0)
    F_i = (1/N) sum_n ( d log p(y_n | x_n; theta0) / d theta_i )^2

(the paper writes lam/2; here lam absorbs the 1/2.) ``log p(y_n | x_n)`` is the log-likelihood of
example n's whole target, the sum over its completion tokens (``completion_loss``'s sum), with the
observed targets y_n (the "empirical" Fisher) and dropout off.

Per-example, not per-batch, squared gradients. F is the mean of each example's *own* squared
gradient, so :func:`estimate_fisher` takes one backward pass per example (a batch is split into
its rows, padding trimmed). Squaring a batch's mean gradient instead would estimate
``E[g]^2 + Var(g) / B``, not ``E[g^2] = E[g]^2 + Var(g)``: near a minimum, where a pre-trained
model sits and ``E[g]`` is about 0, that shrinks F by about the batch size B and makes it depend
on B. The price is N backward passes for N examples: a few hundred examples are enough.

Memory. The anchors theta0 are one detached copy of the trainable parameters, taken once when the
regulariser is made; EWC adds F (float32). The penalty keeps no per-step copy: a custom autograd
function computes ``sum F (theta - theta0)^2`` one tensor at a time and recomputes the gradient
``2 F (theta - theta0)`` in the backward pass, instead of keeping every difference alive in the
autograd graph (which would be another copy of the model until ``backward``).

On resume, make the regulariser from the freshly loaded pre-trained model *before* loading the
checkpoint's weights, so theta0 stays the pre-trained weights (the Fisher estimate is
deterministic: same data, same theta0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.progress import ProgressFactory, silent

KINDS = ("l2sp", "ewc")
Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""``loss_fn(model, batch)``: the negative log-likelihood of the batch's targets, summed (a scalar)."""


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (squared differences underflow in bf16/fp16), else as is."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _WeightedDistance(torch.autograd.Function):
    """``sum(weight * (param - anchor)^2)``; saves only tensors that exist anyway, recomputes in backward."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, anchor: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        diff = _wide(param.detach()) - _wide(anchor)
        ctx.save_for_backward(param, anchor, weight)
        squared = diff.square_()
        return (squared.mul_(weight) if weight is not None else squared).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        param, anchor, weight = ctx.saved_tensors
        grad = _wide(param.detach()) - _wide(anchor)
        if weight is not None:
            grad.mul_(weight)
        return grad.mul_(2 * grad_out).to(param.dtype), None, None


@dataclass
class Regularizer:
    """A quadratic pull of the trainable parameters toward their anchors (see the module docstring)."""

    kind: str
    lam: float
    anchors: dict[str, torch.Tensor]
    """theta0 by parameter name: detached copies, same device and dtype as the parameters."""
    fisher: dict[str, torch.Tensor] | None = None
    """EWC's diagonal Fisher F by parameter name (float32); None for L2-SP (F = 1)."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``lam * sum_i F_i (theta_i - theta0_i)^2`` as a float32 scalar that backpropagates to ``model``."""
        params = dict(model.named_parameters())
        missing = [name for name in self.anchors if name not in params]
        if missing:
            raise UserError(f"the model lacks parameters the {self.kind} regulariser anchors ({missing[0]} ...); "
                            "make the regulariser from the model being trained")  # fmt: skip
        total = torch.zeros((), dtype=torch.float32, device=next(iter(self.anchors.values())).device)
        for name, anchor in self.anchors.items():
            weight = self.fisher[name] if self.fisher is not None else None
            total = total + _WeightedDistance.apply(params[name], anchor, weight).to(total.device)
        return self.lam * total


def make_regularizer(
    kind: str,
    model: nn.Module,
    lam: float,
    fisher_batches: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    progress: ProgressFactory = silent,
) -> Regularizer:
    """An L2-SP (``"l2sp"``) or EWC (``"ewc"``) regulariser anchored at ``model``'s current trainable weights.

    EWC needs ``fisher_batches``: batches of data of the tasks to keep (e.g. collated batches of
    their training examples), from which :func:`estimate_fisher` computes F at the current weights.
    ``loss_fn`` defaults to the completion loss (sum over completion tokens) of an HF model.
    """
    if kind not in KINDS:
        raise UserError(f"unknown regulariser '{kind}'; choose one of {', '.join(KINDS)}")
    if not lam >= 0:
        raise UserError(f"the regularisation strength lambda must be >= 0, got {lam}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UserError("the model has no trainable parameters to regularise; set the method before the regulariser")
    fisher = None
    if kind == "ewc":
        if fisher_batches is None:
            raise UserError("EWC needs data of the tasks to keep, to estimate the Fisher information; "
                            "give it batches of their examples")  # fmt: skip
        fisher = estimate_fisher(model, fisher_batches, loss_fn, progress)
    anchors = {name: p.detach().clone() for name, p in params.items()}
    return Regularizer(kind, float(lam), anchors, fisher)


def estimate_fisher(
    model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn | None = None, progress: ProgressFactory = silent
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher at the current weights: the mean over examples of each example's
    squared gradient of its log-likelihood (float32, by trainable parameter name)."""
    loss_fn = loss_fn or _completion_nll(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()  # dropout off: the Fisher of the model as it predicts
    count = 0
    bar = progress("fisher", None, "example")
    try:
        for batch in batches:
            for row in split_rows(batch, _is_seq2seq(model)):
                nll = loss_fn(model, row)
                grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
                for f, g in zip(fisher.values(), grads):
                    if g is not None:
                        f.add_(g.detach().float().square())
                count += 1
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if count == 0:
        raise UserError("no examples to estimate the Fisher information from; give EWC a non-empty data set")
    for f in fisher.values():
        f.div_(count)
    return fisher


def split_rows(batch: Batch, is_seq2seq: bool = False) -> list[dict[str, torch.Tensor]]:
    """The examples of a batch, each a batch of one, as it would be alone: right padding is trimmed
    (``input_ids`` / ``attention_mask`` where the mask is 0 at the end, and the ``labels`` with them for
    a decoder-only model; trailing -100 labels for a seq2seq model). Other keys are only sliced."""
    size = len(next(iter(batch.values())))
    rows = []
    for i in range(size):
        row = {key: value[i : i + 1] for key, value in batch.items()}  # (1, ...)
        mask = row.get("attention_mask")
        if mask is not None:
            length = int(mask.sum())
            if bool(mask[0, :length].all()):  # right-padded: drop the padding columns
                aligned = ("input_ids", "attention_mask") + (() if is_seq2seq else ("labels",))
                row.update({k: row[k][:, :length] for k in aligned if k in row})
        if is_seq2seq and "labels" in row:
            kept = (row["labels"][0] != -100).nonzero()
            row["labels"] = row["labels"][:, : int(kept[-1]) + 1 if len(kept) else 1]
        rows.append(row)
    return rows


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _completion_nll(model: nn.Module) -> LossFn:
    from peftlab.training.loss import completion_loss

    is_seq2seq = _is_seq2seq(model)
    return lambda m, batch: completion_loss(m, batch, is_seq2seq)[0]
