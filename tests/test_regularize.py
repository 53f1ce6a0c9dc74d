"""L2-SP and EWC: penalty values and gradients, the Fisher against closed forms and per-example recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from peftlab.data.encode import collate, encode_example
from peftlab.errors import UserError
from peftlab.training.loss import completion_loss
from peftlab.training.regularize import estimate_fisher, make_regularizer, split_rows


def one_line(info) -> str:
    message = str(info.value)
    assert message and "\n" not in message
    return message


def load(folder, seq2seq: bool):
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return auto.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def batches_of(tokenizer, seq2seq: bool, pairs, batch_size: int):
    encoded = [encode_example(tokenizer, p, c, is_seq2seq=seq2seq, chat=False, max_length=64, max_target_length=16)
               for p, c in pairs]  # fmt: skip
    return [collate(encoded[i : i + batch_size], tokenizer.pad_token_id, seq2seq) for i in range(0, len(encoded), batch_size)]


PAIRS = [("Summarize: Tom and Anna meet on Friday at the cafe.", "They meet on Friday."),
         ("Hi", "Hello there, friend, how are you today?"),
         ("Rate this review: great kettle, very quiet.", "5"),
         ("Translate into Python: Add 3 to x, then double it.", "result = (x + 3) * 2"),
         ("Question: what is the capital of France?", "Paris")]  # fmt: skip


def perturb(model, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


# ------------------------------------------------------------------------------------------ L2-SP


@pytest.mark.parametrize("seq2seq", [False, True])
def test_l2sp_value_and_gradient(seq2seq, tiny_llama_dir, tiny_t5_dir):
    model, _ = load(tiny_t5_dir if seq2seq else tiny_llama_dir, seq2seq)
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen: not anchored, not penalised
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lam = 0.37
    reg = make_regularizer("l2sp", model, lam)
    assert set(reg.anchors) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert reg.penalty(model).item() == 0.0
    perturb(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    penalty = reg.penalty(model)
    expected = lam * sum(((p.detach().double() - theta0[n].double()) ** 2).sum() for n, p in model.named_parameters()
                         if p.requires_grad)  # fmt: skip
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * lam * (p.detach() - theta0[name]), rtol=1e-5, atol=1e-7)
        else:
            assert p.grad is None


def test_anchors_are_one_detached_copy_and_the_penalty_saves_no_differences(tiny_llama_dir):
    model, _ = load(tiny_llama_dir, False)
    reg = make_regularizer("l2sp", model, 1.0)
    params = dict(model.named_parameters())
    for name, anchor in reg.anchors.items():
        assert anchor.data_ptr() != params[name].data_ptr() and not anchor.requires_grad
    with torch.no_grad():
        params["lm_head.weight"].add_(1.0)
    assert not torch.equal(reg.anchors["lm_head.weight"], params["lm_head.weight"])
    existing = {t.data_ptr() for t in [*params.values(), *reg.anchors.values()]}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        penalty = reg.penalty(model)
    penalty.backward()
    # the autograd graph holds the parameters and anchors themselves, not per-step (theta - theta0) copies
    assert saved and all(t.data_ptr() in existing for t in saved if t.numel() > 1)


def test_l2sp_gradient_descent_reaches_the_closed_form_optimum():
    """min ||X w - y||^2 + lam ||w - w0||^2  =>  w* = (X^T X + lam I)^-1 (X^T y + lam w0)."""
    torch.manual_seed(0)
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    w0 = model.weight.detach().clone()[0]
    lam = 4.0
    reg = make_regularizer("l2sp", model, lam)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = ((model(X)[:, 0] - y) ** 2).sum() + reg.penalty(model)
        loss.backward()
        return loss

    optimizer.step(closure)
    expected = torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=torch.float64), X.T @ y + lam * w0)
    torch.testing.assert_close(model.weight.detach()[0], expected, rtol=1e-6, atol=1e-8)


# -------------------------------------------------------------------------------------------- EWC


def test_fisher_of_logistic_regression_matches_the_closed_form():
    """log p(y | x) = y log s + (1 - y) log(1 - s), s = sigmoid(w.x + b): its gradient is (y - s) (x, 1)."""
    torch.manual_seed(0)
    x = torch.randn(13, 4, dtype=torch.float64)
    y = (torch.rand(13, dtype=torch.float64) < 0.5).double()
    model = nn.Linear(4, 1).double()

    def nll(m, batch):
        return nn.functional.binary_cross_entropy_with_logits(m(batch["x"])[:, 0], batch["y"], reduction="sum")

    batches = [{"x": x[:5], "y": y[:5]}, {"x": x[5:6], "y": y[5:6]}, {"x": x[6:], "y": y[6:]}]  # uneven on purpose
    fisher = estimate_fisher(model, batches, nll)
    with torch.no_grad():
        residual = y - torch.sigmoid(model(x)[:, 0])  # (N,)
    torch.testing.assert_close(fisher["weight"][0], (residual[:, None] ** 2 * x**2).mean(0).float())
    torch.testing.assert_close(fisher["bias"], (residual**2).mean(0, keepdim=True).float())
    # the per-batch alternative, (mean gradient)^2, is a different (smaller) number: why we go per example
    per_batch = ((residual[:, None] * x).mean(0) ** 2).float()
    assert (per_batch < fisher["weight"][0]).all()


@pytest.mark.parametrize("seq2seq", [False, True])
def test_fisher_of_a_tiny_model_equals_per_example_recomputation(seq2seq, tiny_llama_dir, tiny_t5_dir):
    model, tok = load(tiny_t5_dir if seq2seq else tiny_llama_dir, seq2seq)
    model.train()  # estimate_fisher turns dropout off itself and restores the mode
    fisher = estimate_fisher(model, batches_of(tok, seq2seq, PAIRS, batch_size=3))  # padded batches of 3 and 2
    assert model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    reference = [torch.zeros_like(p) for p in params]
    for pair in PAIRS:  # each example alone: no padding at all
        (batch,) = batches_of(tok, seq2seq, [pair], batch_size=1)
        grads = torch.autograd.grad(completion_loss(model, batch, seq2seq)[0], params, allow_unused=True)
        for r, g in zip(reference, grads):
            if g is not None:
                r += g**2 / len(PAIRS)
    for (name, _), r in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], reference):
        torch.testing.assert_close(fisher[name], r, rtol=2e-4, atol=1e-9, msg=name)
    assert sum(f.sum() for f in fisher.values()) > 0


def test_split_rows_trims_right_padding(tiny_llama_dir, tiny_t5_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    (batch,) = batches_of(tok, False, PAIRS[:2], batch_size=2)
    rows = split_rows(batch)
    alone = [batches_of(tok, False, [p], 1)[0] for p in PAIRS[:2]]
    for row, single in zip(rows, alone):
        assert {k: v.tolist() for k, v in row.items()} == {k: v.tolist() for k, v in single.items()}
    (batch,) = batches_of(tok, True, PAIRS[:2], batch_size=2)
    for row, pair in zip(split_rows(batch, is_seq2seq=True), PAIRS[:2]):
        single = batches_of(tok, True, [pair], 1)[0]
        assert {k: v.tolist() for k, v in row.items()} == {k: v.tolist() for k, v in single.items()}


def test_ewc_penalty_and_gradient_use_the_fisher(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, False)
    batches = batches_of(tok, False, PAIRS, batch_size=2)
    fisher = estimate_fisher(model, batches)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lam = 50.0
    reg = make_regularizer("ewc", model, lam, fisher_batches=batches)
    for name in fisher:
        torch.testing.assert_close(reg.fisher[name], fisher[name])  # deterministic estimate
    assert reg.penalty(model).item() == 0.0
    perturb(model)
    penalty = reg.penalty(model)
    expected = lam * sum((fisher[n].double() * (p.detach().double() - theta0[n].double()) ** 2).sum()
                         for n, p in model.named_parameters())  # fmt: skip
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * lam * fisher[name] * (p.detach() - theta0[name]), rtol=1e-5, atol=1e-9)


def test_errors(tiny_llama_dir):
    model, _ = load(tiny_llama_dir, False)
    for call, expected in [
        (lambda: make_regularizer("l1", model, 1.0), "unknown regulariser 'l1'"),
        (lambda: make_regularizer("l2sp", model, -1.0), "must be >= 0"),
        (lambda: make_regularizer("ewc", model, 1.0), "EWC needs data"),
        (lambda: make_regularizer("ewc", model, 1.0, fisher_batches=[]), "no examples"),
    ]:
        with pytest.raises(UserError) as info:
            call()
        assert expected in one_line(info)
    reg = make_regularizer("l2sp", model, 1.0)
    other = nn.Linear(2, 2)
    with pytest.raises(UserError, match="lacks parameters"):
        reg.penalty(other)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        make_regularizer("l2sp", model, 1.0)
