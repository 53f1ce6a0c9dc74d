"""Soft-prompt nearest neighbours: a prompt started from a text reads back as that text's tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import build_llama, build_t5, build_tokenizer

from peftlab.errors import UserError
from peftlab.peft import (
    IA3Config,
    PromptTuningConfig,
    apply_ia3,
    apply_prompt_tuning,
    load_prompt_embeddings,
    nearest_tokens,
    prompt_embeddings,
    save_adapter,
)

TOKENIZER = build_tokenizer()
TEXT = "Summarize the following conversation."


@pytest.mark.parametrize("build", [build_llama, build_t5], ids=["llama", "t5"])
def test_text_init_reads_back_as_its_tokens(build, tmp_path):
    text_ids = TOKENIZER(TEXT, add_special_tokens=False)["input_ids"]
    n = len(text_ids) + 3  # repeated past the text's length, as peft's TEXT init
    config = PromptTuningConfig(num_virtual_tokens=n, prompt_init="text", prompt_init_text=TEXT)
    model = apply_prompt_tuning(build(TOKENIZER), config, TOKENIZER)
    expected = (text_ids * 2)[:n]

    neighbours = nearest_tokens(model, TOKENIZER, prompt_embeddings(model), k=3)
    assert len(neighbours) == n and all(len(row) == 3 for row in neighbours)
    assert [row[0][0] for row in neighbours] == [TOKENIZER.decode([i]) for i in expected]
    assert all(row[0][1] == pytest.approx(1.0, abs=1e-5) for row in neighbours)
    assert all(row[0][1] >= row[1][1] >= row[2][1] for row in neighbours)  # best first

    # The runner-up similarities are the true cosines (against a brute-force reference).
    table = model.get_input_embeddings().weight.detach()
    cosines = F.cosine_similarity(table[expected[0]].unsqueeze(0), table, dim=-1)  # (V,)
    cosines[expected[0]] = -2
    assert neighbours[0][1] == (TOKENIZER.decode([int(cosines.argmax())]), pytest.approx(cosines.max().item(), abs=1e-5))

    # The same read from the saved adapter folder, without the model's soft prompt.
    save_adapter(model, tmp_path, config)
    loaded = load_prompt_embeddings(tmp_path)
    assert torch.equal(loaded, prompt_embeddings(model))
    assert nearest_tokens(build(TOKENIZER), TOKENIZER, loaded, k=3) == neighbours


def test_errors(tmp_path):
    model = build_llama(TOKENIZER)
    with pytest.raises(UserError, match="k must be a positive integer"):
        nearest_tokens(model, TOKENIZER, torch.zeros(2, 64), k=0)
    with pytest.raises(UserError, match=r"shape \(2, 32\) but the model's embeddings are 64 wide"):
        nearest_tokens(model, TOKENIZER, torch.zeros(2, 32))
    with pytest.raises(UserError, match="has no soft prompt"):
        prompt_embeddings(model)
    save_adapter(apply_ia3(model, IA3Config()), tmp_path, IA3Config())
    with pytest.raises(UserError, match="holds a IA3 adapter, not a soft prompt"):
        load_prompt_embeddings(tmp_path)
