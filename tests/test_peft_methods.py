"""Every additive and selective PEFT method on tiny Llama-style and T5 models, table-driven.

Each method: logits at step 0 equal the base model's when it starts as the identity; 30 AdamW
steps on a fixed batch through ``completion_loss`` lower the loss and leave every frozen weight
bit-identical; save -> load through the adapter folder gives the same logits. Soft prompts and
prefixes also generate with the KV cache exactly as a no-cache argmax loop does.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import build_llama, build_t5, build_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.data.encode import IGNORE_INDEX, encode_prompts
from peftlab.errors import UserError
from peftlab.eval.generate import generate
from peftlab.peft import (
    BottleneckAdapter,
    BottleneckConfig,
    IA3Config,
    IA3Linear,
    PrefixConfig,
    PromptTuningConfig,
    SelectiveConfig,
    adapter_parameters,
    apply_bottleneck,
    apply_ia3,
    apply_prefix,
    apply_prompt_tuning,
    apply_selective,
    load_adapter,
    parameter_report,
    save_adapter,
    virtual_token_count,
)
from peftlab.training.loss import completion_loss

TOKENIZER = build_tokenizer()


def build_llama_bias(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama with biases on every projection (the tiny models have none), for BitFit."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attention_bias=True, mlp_bias=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


BUILDERS = {"llama": build_llama, "t5": build_t5, "llama-bias": build_llama_bias}


def base(kind: str):
    return BUILDERS[kind](TOKENIZER)


def apply(model, config):
    appliers = {BottleneckConfig: apply_bottleneck, IA3Config: apply_ia3, PrefixConfig: apply_prefix,
                SelectiveConfig: apply_selective}
    if isinstance(config, PromptTuningConfig):
        return apply_prompt_tuning(model, config, TOKENIZER)
    return appliers[type(config)](model, config)


# name: (config, model kinds, starts as the base model, learning rate)
METHODS = {
    "houlsby": (BottleneckConfig(reduction_factor=4, placement="houlsby"), ("llama", "t5"), True, 3e-2),
    "pfeiffer": (BottleneckConfig(reduction_factor=4, placement="pfeiffer"), ("llama", "t5"), True, 3e-2),
    "prompt": (PromptTuningConfig(num_virtual_tokens=4, prompt_init="vocab"), ("llama", "t5"), False, 1e-1),
    "prefix": (PrefixConfig(num_virtual_tokens=4, projection_hidden=32), ("llama",), False, 3e-2),
    "ia3": (IA3Config(), ("llama", "t5"), True, 1e-1),
    "bitfit": (SelectiveConfig(method="bitfit"), ("llama-bias",), True, 1e-2),
    "layernorm": (SelectiveConfig(method="layernorm"), ("llama", "t5"), True, 1e-1),
    "selective-layers": (SelectiveConfig(method="selective", train_layers="1"), ("llama", "t5"), True, 1e-3),
}
CASES = [pytest.param(name, kind, id=f"{name}-{kind}") for name, (_, kinds, _, _) in METHODS.items() for kind in kinds]


def train_batch(kind: str) -> dict[str, torch.Tensor]:
    """Two right-padded examples; the loss counts the completion tokens only."""
    gen = torch.Generator().manual_seed(3)
    if kind == "t5":
        ids = torch.randint(4, 300, (2, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        labels = torch.randint(4, 300, (2, 6), generator=gen)
        labels[1, 4:] = IGNORE_INDEX
        return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}
    ids = torch.randint(4, 300, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :5] = IGNORE_INDEX  # the prompt part
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def logits(model, kind: str) -> torch.Tensor:
    """Logits at the attended positions of a padded batch, (tokens, V)."""
    batch = train_batch(kind)
    if kind == "t5":
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids)
        return out.logits.flatten(0, 1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[batch["attention_mask"].bool()]


def loss(model, kind: str) -> torch.Tensor:
    total, count = completion_loss(model, train_batch(kind), is_seq2seq=kind == "t5")
    return total / count


@pytest.mark.parametrize("name, kind", CASES)
def test_method_trains_saves_and_loads(name, kind, tmp_path):
    config, _, identity, lr = METHODS[name]
    model = apply(base(kind), config)
    reference = logits(base(kind), kind)
    start = logits(model, kind)
    if identity:
        assert torch.equal(start, reference)
    else:
        assert (start - reference).abs().max() > 1e-3  # the prompt or prefix changes the output

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapter_ids = {id(p) for p in adapter_parameters(model).values()}
    assert trainable and {id(p) for p in trainable.values()} == adapter_ids
    assert parameter_report(model).trainable == sum(p.numel() for p in trainable.values())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in trainable.items()}

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)  # every parameter: frozen ones must get no gradient
    with torch.no_grad():
        first = loss(model, kind).item()
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        loss(model, kind).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        last = loss(model, kind).item()
    # The tiny random models' output head (weights ~0.02) caps how far the loss can fall from ln(400) = 6.0
    # when it stays frozen, so a fixed drop in nats, not a ratio.
    assert last < first - 0.1, (first, last)
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trained_before[n]), n

    trained = logits(model, kind)
    save_adapter(model, tmp_path, config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"]
    loaded = load_adapter(base(kind), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert (logits(loaded, kind) - trained).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["houlsby", "prompt", "prefix", "ia3"])
def test_bfloat16_base(name):
    """On a bfloat16 model the added tensors stay float32 (and get float32 gradients); the output stays bfloat16."""
    model = apply(base("llama").to(torch.bfloat16), METHODS[name][0])
    added = adapter_parameters(model).values()
    assert {p.dtype for p in added} == {torch.float32}
    model.train()
    out = model(**{k: v for k, v in train_batch("llama").items() if k != "labels"})
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in added)


def test_parameter_counts():
    """Trainable sizes from the formulas in the modules' docstrings, on the tiny models (d=64, d_ff=128, 2 blocks)."""
    counts = {
        # houlsby on Llama: o_proj and down_proj of 2 blocks, hidden 64/4 = 16: 2*64*16 + 16 + 64 each
        ("houlsby", "llama"): 4 * (2 * 64 * 16 + 16 + 64),
        # T5: encoder 2 x (self-attn, ffn) + decoder 2 x (self-attn, cross-attn, ffn)
        ("houlsby", "t5"): 10 * (2 * 64 * 16 + 16 + 64),
        ("pfeiffer", "t5"): 4 * (2 * 64 * 16 + 16 + 64),
        # IA3 on Llama: k and v (2 heads x 16 = 32 each) and down_proj's input (128), per block
        ("ia3", "llama"): 2 * (32 + 32 + 128),
        # T5: k, v (64 each) per attention (2 encoder + 4 decoder) and wo's input (128) per block (4)
        ("ia3", "t5"): 6 * (64 + 64) + 4 * 128,
        ("prompt", "llama"): 4 * 64,
        # prefix through its MLP: P' (4 x 64), W1 (32 x 64) + b1, W2 (2 layers * 2 * 32 = 128 x 32) + b2
        ("prefix", "llama"): 4 * 64 + 32 * 64 + 32 + 128 * 32 + 128,
        # RMSNorm weights: 2 per block + the final norm
        ("layernorm", "llama"): 5 * 64,
    }
    for (name, kind), expected in counts.items():
        assert parameter_report(apply(base(kind), METHODS[name][0])).trainable == expected, (name, kind)
    biased = base("llama-bias")
    biases = sum(p.numel() for n, p in biased.named_parameters() if n.endswith(".bias"))
    assert biases == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # q, k, v, o, gate, up, down per block
    assert parameter_report(apply(biased, SelectiveConfig(method="bitfit"))).trainable == biases


def test_bottleneck_layer_maths():
    """h = y + W_up act(W_down y + b_down) + b_up, written out with plain tensors."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 16)
    layer = BottleneckAdapter(linear, hidden=4, activation="tanh")
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), linear(x))
    with torch.no_grad():
        layer.adapter_up.weight.normal_()
        layer.adapter_up.bias.normal_()
    y = linear(x)
    down, up = layer.adapter_down, layer.adapter_up
    expected = y + torch.tanh(y @ down.weight.T + down.bias) @ up.weight.T + up.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_ia3_layer_maths():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 16)
    x = torch.randn(3, 12)
    kv, ff = IA3Linear(linear, feedforward=False), IA3Linear(linear, feedforward=True)
    assert kv.ia3_l.shape == (16, 1) and ff.ia3_l.shape == (1, 12)
    with torch.no_grad():
        kv.ia3_l.uniform_(0.5, 1.5)
        ff.ia3_l.uniform_(0.5, 1.5)
    assert torch.allclose(kv(x), kv.ia3_l.flatten() * (x @ linear.weight.T + linear.bias), atol=1e-6)
    assert torch.allclose(ff(x), (ff.ia3_l.flatten() * x) @ linear.weight.T + linear.bias, atol=1e-6)


def test_selective_choices():
    llama = apply(base("llama"), SelectiveConfig(method="selective", train_layers="1"))
    names = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in base("llama").named_parameters() if n.startswith("model.layers.1.")}
    t5 = apply(base("t5"), SelectiveConfig(method="selective", train_modules=["q", "EncDecAttention.k"], train_layers="0"))
    names = {n for n, p in t5.named_parameters() if p.requires_grad}
    assert names == {"encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.SelfAttention.q.weight",
                     "decoder.block.0.layer.1.EncDecAttention.q.weight", "decoder.block.0.layer.1.EncDecAttention.k.weight"}
    norms = apply(base("t5"), SelectiveConfig(method="layernorm"))
    names = {n for n, p in norms.named_parameters() if p.requires_grad}
    assert len(names) == 2 * 2 + 1 + 2 * 3 + 1 and all("layer_norm" in n for n in names)


def test_ia3_defaults_follow_peft():
    llama = apply(base("llama"), IA3Config())
    layers = {n: m.feedforward for n, m in llama.named_modules() if isinstance(m, IA3Linear)}
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"k_proj", "v_proj", "down_proj"}
    assert all(ff == n.endswith("down_proj") for n, ff in layers.items())
    t5 = apply(base("t5"), IA3Config())
    layers = {n: m.feedforward for n, m in t5.named_modules() if isinstance(m, IA3Linear)}
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"k", "v", "wo"}
    assert all(ff == n.endswith("wo") for n, ff in layers.items())


def test_pattern_fields_split_at_commas():
    """Every method's pattern fields take a comma-separated string as the command line does."""
    skip_block_1 = r"re:.*layers\.1\d{0,2}\..*"  # a regex's commas are its own
    ia3 = IA3Config(targets="k_proj,v_proj,down_proj", feedforward="down_proj", exclude=skip_block_1)
    assert (ia3.targets, ia3.feedforward, ia3.exclude) == (["k_proj", "v_proj", "down_proj"], ["down_proj"], [skip_block_1])
    layers = {n: m.feedforward for n, m in apply(base("llama"), ia3).named_modules() if isinstance(m, IA3Linear)}
    assert layers == {"model.layers.0.self_attn.k_proj": False, "model.layers.0.self_attn.v_proj": False,
                      "model.layers.0.mlp.down_proj": True}
    assert BottleneckConfig(targets="o_proj,down_proj").targets == ["o_proj", "down_proj"]
    t5 = apply(base("t5"), SelectiveConfig(method="selective", train_modules="q,EncDecAttention.k", train_layers="0"))
    names = {n for n, p in t5.named_parameters() if p.requires_grad}
    assert names == {"encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.SelfAttention.q.weight",
                     "decoder.block.0.layer.1.EncDecAttention.q.weight", "decoder.block.0.layer.1.EncDecAttention.k.weight"}


# ---------------------------------------------------------------------------------------------
# Generation with soft prompts and prefixes

PROMPTS = ["Summarize the following conversation.", "Hi Tom, are we still on for lunch tomorrow at noon? It is cold.", "Paris"]
VIRTUAL = {
    ("prompt", "llama"): PromptTuningConfig(num_virtual_tokens=5),
    ("prompt", "t5"): PromptTuningConfig(num_virtual_tokens=5),
    ("prefix", "llama"): PrefixConfig(num_virtual_tokens=5, projection=False),
}


@torch.no_grad()
def argmax_loop(model, prompt: str, is_seq2seq: bool, steps: int) -> str:
    """Greedy decoding without any cache: the whole sequence through the model at every step."""
    ids = encode_prompts(TOKENIZER, [prompt], is_seq2seq=is_seq2seq, chat=False, max_length=512)["input_ids"]
    out = torch.tensor([[model.config.decoder_start_token_id]]) if is_seq2seq else ids
    new = []
    for _ in range(steps):
        if is_seq2seq:
            step = model(input_ids=ids, decoder_input_ids=out, use_cache=False).logits[0, -1]
        else:
            step = model(input_ids=out, use_cache=False).logits[0, -1]
        token = int(step.argmax())
        new.append(token)
        out = torch.cat([out, torch.tensor([[token]])], dim=1)
        if token == TOKENIZER.eos_token_id:
            break
    return TOKENIZER.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("name, kind", list(VIRTUAL), ids=[f"{n}-{k}" for n, k in VIRTUAL])
def test_generation_with_kv_cache(name, kind):
    torch.manual_seed(0)
    model = apply(base(kind), VIRTUAL[(name, kind)])
    is_seq2seq = kind == "t5"
    result = generate(model, TOKENIZER, PROMPTS, is_seq2seq=is_seq2seq, chat=False, max_new_tokens=10, batch_size=3)
    assert result.texts == [argmax_loop(model, p, is_seq2seq, 10) for p in PROMPTS]
    plain = generate(base(kind), TOKENIZER, PROMPTS, is_seq2seq=is_seq2seq, chat=False, max_new_tokens=10, batch_size=3)
    assert result.texts != plain.texts


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_cache_and_left_padding_match_full_forward(name):
    """Decoding one token with the cache = a full forward, and a left-padded row = the row alone (logits, 1e-5)."""
    model = apply(base("llama"), VIRTUAL[(name, "llama")])
    batch = encode_prompts(TOKENIZER, PROMPTS, is_seq2seq=False, chat=False, max_length=512)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # left padding present
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert first.logits.shape[:2] == ids.shape  # the virtual positions are not in the output
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        cached = model(input_ids=nxt, attention_mask=mask2, cache=first.cache).logits[:, -1]
        full = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1]
        assert (cached - full).abs().max() <= 1e-5
        for row, prompt in enumerate(PROMPTS):
            alone = encode_prompts(TOKENIZER, [prompt], is_seq2seq=False, chat=False, max_length=512)["input_ids"]
            assert (model(input_ids=alone).logits[0, -1] - first.logits[row, -1]).abs().max() <= 1e-5, prompt
    assert virtual_token_count(model) == 5


# ---------------------------------------------------------------------------------------------
# Errors a user can cause


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (lambda: PromptTuningConfig(num_virtual_tokens=-3), "num_virtual_tokens must be a positive integer"),
        (lambda: PromptTuningConfig(prompt_init="text"), "needs --prompt-init-text"),
        (lambda: PromptTuningConfig(prompt_init_text="hello"), "only used with --prompt-init text"),
        (lambda: PrefixConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (lambda: BottleneckConfig(reduction_factor=0), "reduction_factor must be a positive integer"),
        (lambda: BottleneckConfig(placement="middle"), "placement must be one of houlsby, pfeiffer"),
        (lambda: SelectiveConfig(method="selective"), "needs --train-modules"),
        (lambda: SelectiveConfig(method="bitfit", train_modules="q_proj"), "--train-modules is for --method selective"),
        (lambda: SelectiveConfig(train_layers="3-1"), "not a range spec"),
    ],
)
def test_config_errors(make, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_reduction_factor_leaving_no_hidden_units():
    model = base("llama")
    with pytest.raises(UserError, match=r"reduction factor 128 leaves no hidden units for .*o_proj \(width 64\): "
                                        r"use --reduction-factor 64 or less"):
        apply_bottleneck(model, BottleneckConfig(reduction_factor=128))
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())  # nothing injected


def test_bitfit_without_biases():
    for kind in ("llama", "t5"):
        with pytest.raises(UserError, match="has no bias parameters, so BitFit has nothing to train"):
            apply_selective(base(kind), SelectiveConfig(method="bitfit"))


def test_prompt_longer_than_context():
    """512 positions: 20 virtual tokens + 500 input tokens are 8 too many; 492 fit."""
    model = apply_prompt_tuning(base("llama"), PromptTuningConfig(num_virtual_tokens=20))
    with torch.no_grad():
        model(input_ids=torch.full((1, 492), 5))
        with pytest.raises(UserError, match=r"20 virtual tokens\) plus the input \(500 tokens\) need 520 positions, "
                                            r"8 more than the model's context of 512"):
            model(input_ids=torch.full((1, 500), 5))
    prefixed = apply_prefix(base("llama"), PrefixConfig(num_virtual_tokens=20))
    with torch.no_grad(), pytest.raises(UserError, match="8 more than the model's context of 512"):
        prefixed(input_ids=torch.full((1, 500), 5))


def test_prefix_needs_a_decoder_only_model():
    with pytest.raises(UserError, match="prefix tuning supports decoder-only models"):
        apply_prefix(base("t5"), PrefixConfig())
