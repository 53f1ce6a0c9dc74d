"""The training fast paths give the plain computation's losses and gradients (issue 13).

Packed rows equal each example run alone (no cross-contamination), the chunked head + cross-entropy
equals full logits + F.cross_entropy, length grouping is a seeded permutation, gradient
checkpointing changes nothing, and bf16 autocast is refused where the CPU cannot compute in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab import peft
from peftlab.config import TrainConfig
from peftlab.data.encode import IGNORE_INDEX, collate, encode_example, pack, real_tokens
from peftlab.errors import UserError
from peftlab.training import loop
from peftlab.training.loop import micro_batches, train
from peftlab.training.loss import completion_loss, linear_cross_entropy
from peftlab.training.packing import packed_attention, supports_packing
from helpers import losses, write_dialogues

PAIRS = [("Summarize: a long dialogue about the weather and the trains.", "Rain, late trains."),
         ("Hi", "Hello there, friend."), ("Translate: chat", "cat"),
         ("What is two plus two, please answer briefly?", "Four, of course.")]


def _model_and_examples(folder, lora: bool):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if lora:
        model = peft.apply_lora(model, peft.LoraConfig(rank=4, alpha=8, dropout=0.0, targets="q_proj,k_proj,v_proj,o_proj"))
        for name, p in model.named_parameters():  # B = 0 at initialisation would leave A without gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    model.train()
    examples = [encode_example(tok, p, c, is_seq2seq=False, chat=False, max_length=64, max_target_length=16) for p, c in PAIRS]
    return model, tok, examples


def _loss_and_grads(model, batch, packed: bool):
    model.zero_grad(set_to_none=True)
    with packed_attention(model, packed):
        total, count = completion_loss(model, batch, False)
    total.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return total.item(), count, grads


@pytest.mark.parametrize("lora", [False, True])
def test_packed_row_equals_each_example_alone(tiny_llama_dir, lora):
    """Sum of losses and gradients of the examples run one by one = those of the packed row."""
    model, _, examples = _model_and_examples(tiny_llama_dir, lora)
    alone = [_loss_and_grads(model, collate([e], 0, False), packed=False) for e in examples]
    packed_loss, packed_count, packed_grads = _loss_and_grads(model, pack(examples), packed=True)
    assert packed_count == sum(n for _, n, _ in alone)
    assert packed_loss == pytest.approx(sum(loss for loss, _, _ in alone), rel=1e-5)
    assert packed_grads.keys() == alone[0][2].keys() and packed_grads
    for name, grad in packed_grads.items():
        expected = sum(g[name] for _, _, g in alone)
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6), name


def test_packed_row_contaminates_nothing(tiny_llama_dir):
    """Changing one example's tokens leaves the other examples' per-token losses in the packed row unchanged."""
    model, tok, examples = _model_and_examples(tiny_llama_dir, lora=False)
    other = encode_example(tok, "Entirely different words here", "Something else.", is_seq2seq=False, chat=False,
                           max_length=64, max_target_length=16)

    @torch.no_grad()
    def token_losses(batch):
        with packed_attention(model):
            hidden = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                      cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                                      use_cache=False).last_hidden_state
        return F.cross_entropy(model.lm_head(hidden[0, :-1]), batch["labels"][0, 1:], reduction="none")

    a = token_losses(pack(examples))
    b = token_losses(pack([other] + examples[1:]))
    shift = len(other.input_ids) - len(examples[0].input_ids)
    start = len(examples[0].input_ids)
    assert torch.allclose(a[start:], b[start + shift :], atol=1e-5)


def test_packed_and_padded_batches_give_the_same_loss_on_both_attention_paths(tiny_llama_dir):
    """Packed through peftlab's per-example SDPA, and through transformers' own block-diagonal mask."""
    model, tok, examples = _model_and_examples(tiny_llama_dir, lora=False)
    padded, n = completion_loss(model, collate(examples, tok.pad_token_id, False), False)
    with packed_attention(model):
        ours, m = completion_loss(model, pack(examples), False)
    theirs, _ = completion_loss(model, pack(examples), False)  # no packed attention: transformers' mask from positions
    assert n == m and torch.allclose(ours, padded, rtol=1e-5) and torch.allclose(theirs, padded, rtol=1e-5)


def test_pack_layout():
    from peftlab.data.encode import Encoded

    batch = pack([Encoded([1, 2, 3], [IGNORE_INDEX, 5, 6]), Encoded([7, 8], [7, 8])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 8]]  # each example's first label never counts
    assert real_tokens(batch) == 5 and real_tokens(collate([Encoded([1, 2, 3], [1, 2, 3]), Encoded([1], [1])], 0, False)) == 4


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 7, 100])
def test_chunked_linear_cross_entropy_equals_full_logits(chunk, bias):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(20, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (20,), generator=g)
    ref = F.cross_entropy(head(hidden), targets, reduction="sum") / 7
    ref.backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad, head.weight.grad, head.bias = None, None, head.bias
    if bias:
        head.bias.grad = None
    ours = linear_cross_entropy(hidden, head, targets, chunk=chunk) / 7
    ours.backward()
    got = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    assert torch.allclose(ours, ref, rtol=1e-6)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # a forward-only use (validation) computes no gradients and gives the same value
        assert torch.allclose(linear_cross_entropy(hidden, head, targets, chunk=chunk) / 7, ref, rtol=1e-6)


def test_frozen_head_gets_no_gradient():
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8, requires_grad=True)
    linear_cross_entropy(hidden, head, torch.arange(5), chunk=2).backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_length_grouped_order_is_a_seeded_permutation_of_similar_lengths():
    lengths = [int(x) for x in torch.randint(5, 500, (1000,), generator=torch.Generator().manual_seed(3))]
    grouped = [b for _, b in micro_batches(1000, 8, seed=1, epoch=0, start=0, lengths=lengths)]
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == [b for _, b in micro_batches(1000, 8, seed=1, epoch=0, start=0, lengths=lengths)]
    assert grouped[5:] == [b for _, b in micro_batches(1000, 8, seed=1, epoch=0, start=5, lengths=lengths)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = [b for _, b in micro_batches(1000, 8, seed=1, epoch=0, start=0)]
    assert padding(grouped) < 0.1 * padding(plain)
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)  # the steps' order stays random


def test_packing_only_where_it_applies(tiny_llama_dir):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert supports_packing(llama, False, 0)
    assert not supports_packing(llama, False, virtual_tokens=4)  # prompt / prefix tuning prepend per row
    assert not supports_packing(llama, True, 0)  # encoder-decoder


@pytest.mark.parametrize("method", ["full", "lora"])
def test_packed_training_equals_padded_training(tiny_llama_dir, tmp_path, method):
    data = write_dialogues(tmp_path / "d.jsonl", n=40)
    common = dict(model=str(tiny_llama_dir), data=str(data), max_steps=3, lr=1e-3, device="cpu", eval_limit=4,
                  method=method, batch_size=8)
    packed = train(TrainConfig(out=str(tmp_path / "packed"), **common))
    padded = train(TrainConfig(out=str(tmp_path / "padded"), batching="padded", **common))
    # AdamW divides by sqrt(v): float-rounding differences of the gradients grow a little over the steps
    assert losses(packed.run_dir) == pytest.approx(losses(padded.run_dir), rel=1e-4)
    assert packed.eval_loss == pytest.approx(padded.eval_loss, rel=1e-4)


def test_gradient_checkpointing_changes_nothing(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=24)
    common = dict(model=str(tiny_llama_dir), data=str(data), max_steps=2, lr=1e-3, device="cpu", eval_limit=2,
                  method="lora", dropout=0.1)  # dropout: the recomputed pass must replay the same masks
    plain = train(TrainConfig(out=str(tmp_path / "a"), **common))
    checkpointed = train(TrainConfig(out=str(tmp_path / "b"), gradient_checkpointing=True, **common))
    assert losses(plain.run_dir) == losses(checkpointed.run_dir)


def test_group_by_length_order_resumes_where_it_stopped():
    lengths = list(range(30, 0, -1))
    order = loop.DataOrder(30, 4, seed=2, lengths=lengths)
    taken = [order.take() for _ in range(10)]  # past the end of the first epoch (8 micro-batches)
    resumed = loop.DataOrder(30, 4, seed=2, epoch=0, next_micro=3, lengths=lengths)
    assert [resumed.take() for _ in range(7)] == taken[3:]


def test_group_by_length_trains(tiny_llama_dir, tmp_path):
    data = write_dialogues(tmp_path / "d.jsonl", n=40)
    result = train(TrainConfig(model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "run"), max_steps=3,
                               lr=1e-3, device="cpu", eval_limit=2, batch_size=4, group_by_length=True, batching="padded"))
    assert len(losses(result.run_dir)) == 3


def test_autocast_bf16_is_refused_without_bf16_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(UserError, match="no bfloat16 arithmetic"):
        loop.check_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    loop.check_bf16(torch.device("cpu"))


@pytest.mark.parametrize("lora", [False, True])
def test_lean_gated_mlp_same_gradients_fewer_saved_activations(tiny_llama_dir, lora):
    """The SwiGLU product that recomputes silu(gate) in backward: bit-identical loss and gradients, and
    exactly one (tokens, intermediate) activation per layer fewer kept for the backward pass."""
    from peftlab.training.lean_mlp import lean_gated_mlps

    model, _, examples = _model_and_examples(tiny_llama_dir, lora)
    batch = pack(examples)

    def run():
        saved = {}

        def keep(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss, count, grads = _loss_and_grads(model, batch, packed=True)
        return loss, grads, sum(saved.values())

    loss, grads, plain_bytes = run()
    layers = model.config.num_hidden_layers
    assert lean_gated_mlps(model) == layers
    lean_loss, lean_grads, lean_bytes = run()
    assert lean_loss == loss
    assert lean_grads.keys() == grads.keys() and all(torch.equal(lean_grads[k], grads[k]) for k in grads)
    tokens = batch["input_ids"].shape[1]
    assert plain_bytes - lean_bytes == layers * tokens * model.config.intermediate_size * 4  # float32


def test_lora_dropout_keeps_masks_not_dropped_inputs(tiny_llama_dir, monkeypatch):
    """LoRA with dropout on every linear layer: the lean dropout path gives autograd's own loss and
    gradients for the same seed (the same masks), and keeps fewer bytes for the backward pass."""
    from peftlab.peft import lora as lora_module

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    examples = [encode_example(tok, p, c, is_seq2seq=False, chat=False, max_length=64, max_target_length=16) for p, c in PAIRS]
    batch = pack(examples)
    model = peft.apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                            peft.LoraConfig(rank=4, alpha=8, dropout=0.1, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    model.train()

    def run():
        saved = {}

        def keep(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss, _, grads = _loss_and_grads(model, batch, packed=True)
        return loss, grads, sum(saved.values())

    lean_loss, lean_grads, lean_bytes = run()
    monkeypatch.setattr(lora_module._DroppedDown, "apply", lambda x, w, p: F.linear(F.dropout(x, p, True), w))
    loss, grads, plain_bytes = run()
    assert lean_loss == loss
    assert lean_grads.keys() == grads.keys() and len(grads) == 2 * 7 * model.config.num_hidden_layers
    for k in grads:
        torch.testing.assert_close(lean_grads[k], grads[k], rtol=1e-6, atol=1e-7)
    assert lean_bytes < 0.8 * plain_bytes
