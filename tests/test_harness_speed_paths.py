"""The harness's fast paths give the plain computation's results.

Log-likelihoods with a shared prefix (the tokens every row starts with run once, their KV cache
expanded to each batch) equal those of full rows to float rounding, with the same greedy flags and
picks; the test also checks the shared path really ran (the batches' inputs are shorter than the
rows) and that it steps aside where it cannot apply (truncated rows, soft prompts, one row).
"""

from __future__ import annotations

import pytest

from peftlab.eval.harness import evaluate_task, resolve_tasks
from peftlab.eval.harness.scoring import loglikelihoods
from peftlab.eval.loglikelihood import continuation_loglikelihoods
from peftlab.models import load_model

FEWSHOT = ("Answer each question about paint.\n\n"
           + "".join(f"Question: which colour is item {i}?\nAnswer: {c}\n\n" for i, c in enumerate(["red", "blue", "green"])))
QUESTIONS = ["Question: which colour is item 7?\nAnswer:", "Question: and the sky at noon on a clear day?\nAnswer:",
             "Question: grass?\nAnswer:", "Question: what colour do you get from mixing red and yellow paint?\nAnswer:",
             "Question: snow?\nAnswer:"]
CHOICES = [" red", " blue", " green and yellow stripes", " orange"]


def _requests() -> list[tuple[str, str]]:
    return [(FEWSHOT + q, c) for q in QUESTIONS for c in CHOICES]


def _input_widths(model) -> tuple[list[int], object]:
    """Record the sequence length of every forward's input_ids."""
    widths: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            widths.append(ids.shape[1])

    return widths, model.register_forward_pre_hook(hook, with_kwargs=True)


def _assert_same(plain, shared, tol: float = 1e-5) -> None:
    assert len(plain) == len(shared)
    for a, b in zip(plain, shared):
        assert b.logprob == pytest.approx(a.logprob, abs=tol)
        assert (b.is_greedy, b.num_tokens) == (a.is_greedy, a.num_tokens)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_prefix_equals_full_rows(tiny_llama_dir, batch_size):
    loaded = load_model(str(tiny_llama_dir))
    requests = _requests()
    plain = loglikelihoods(loaded.model, loaded.tokenizer, requests, is_seq2seq=False, batch_size=batch_size,
                           share_prefix=False)
    widths, handle = _input_widths(loaded.model)
    try:
        shared = loglikelihoods(loaded.model, loaded.tokenizer, requests, is_seq2seq=False, batch_size=batch_size)
    finally:
        handle.remove()
    _assert_same(plain, shared)
    # The prefix ran once (the first, widest forward); every batch after it is shorter than the few-shot prefix.
    prefix_tokens = len(loaded.tokenizer.encode(FEWSHOT)) - 2
    assert widths[0] >= prefix_tokens
    assert max(widths[1:]) < prefix_tokens
    picks = [max(range(len(CHOICES)), key=lambda j: r[j].logprob) for r in
             (shared[i : i + len(CHOICES)] for i in range(0, len(shared), len(CHOICES)))]
    plain_picks = [max(range(len(CHOICES)), key=lambda j: r[j].logprob) for r in
                   (plain[i : i + len(CHOICES)] for i in range(0, len(plain), len(CHOICES)))]
    assert picks == plain_picks


def test_shared_prefix_stops_before_needed_logits(tiny_llama_dir):
    """A context that is the prefix of another's: the shared part ends before the shorter row's continuation."""
    loaded = load_model(str(tiny_llama_dir))
    ids = loaded.tokenizer.encode(FEWSHOT)
    pairs = [(ids, [5, 6, 7]), (ids + [9, 10, 11], [12]), (ids[:-1], [ids[-1], 3])]
    pad = loaded.tokenizer.pad_token_id or 0
    plain = continuation_loglikelihoods(loaded.model, pairs, is_seq2seq=False, max_length=512, pad_id=pad,
                                        share_prefix=False)
    shared = continuation_loglikelihoods(loaded.model, pairs, is_seq2seq=False, max_length=512, pad_id=pad)
    _assert_same(plain, shared)


def test_truncated_rows_share_nothing_and_still_match(tiny_llama_dir):
    """Left truncation cuts the rows' starts apart: no prefix in common, the plain path runs."""
    loaded = load_model(str(tiny_llama_dir))
    ids = loaded.tokenizer.encode(FEWSHOT)
    pairs = [(ids + [40 + i] * (i + 1), [7, 8]) for i in range(4)]
    pad = loaded.tokenizer.pad_token_id or 0
    plain = continuation_loglikelihoods(loaded.model, pairs, is_seq2seq=False, max_length=12, pad_id=pad,
                                        share_prefix=False)
    widths, handle = _input_widths(loaded.model)
    try:
        shared = continuation_loglikelihoods(loaded.model, pairs, is_seq2seq=False, max_length=12, pad_id=pad)
    finally:
        handle.remove()
    _assert_same(plain, shared, tol=0.0)
    assert widths == [12]  # one batch of full rows, no prefix forward


def test_soft_prompt_skips_the_shared_prefix(tiny_llama_dir):
    from peftlab.peft.prompt_tuning import PromptTuningConfig, apply_prompt_tuning

    loaded = load_model(str(tiny_llama_dir))
    apply_prompt_tuning(loaded.model, PromptTuningConfig(num_virtual_tokens=4))
    requests = _requests()[:8]
    plain = loglikelihoods(loaded.model, loaded.tokenizer, requests, is_seq2seq=False, share_prefix=False)
    shared = loglikelihoods(loaded.model, loaded.tokenizer, requests, is_seq2seq=False)
    _assert_same(plain, shared, tol=0.0)


def test_few_shot_mmlu_items_equal_with_and_without_sharing(tiny_llama_dir, shared_data, monkeypatch):
    """A real few-shot task end to end: per-item picks, acc, acc_norm and greedy flags identical.

    One shot: the tiny model's 512 positions hold it whole (longer prompts are cut from the left, and
    rows cut differently share no prefix)."""
    import peftlab.eval.harness.scoring as scoring

    loaded = load_model(str(tiny_llama_dir))
    (task,) = resolve_tasks(["mmlu_anatomy"], data_root=shared_data, split="val")
    widths, handle = _input_widths(loaded.model)
    try:
        shared = evaluate_task(loaded, task, num_fewshot=1, limit=6, batch_size=4)
    finally:
        handle.remove()
    assert widths[0] > 100 and len(widths) == 3  # the description and the shot once, then two batches
    original = scoring.continuation_loglikelihoods
    monkeypatch.setattr(scoring, "continuation_loglikelihoods",
                        lambda *a, **k: original(*a, **{**k, "share_prefix": False}))
    plain = evaluate_task(loaded, task, num_fewshot=1, limit=6, batch_size=4)
    for a, b in zip(plain.items, shared.items):
        assert (a["pred"], a["acc"], a["acc_norm"], a["is_greedy"]) == (b["pred"], b["acc"], b["acc_norm"], b["is_greedy"])
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-5)
