"""Target selection, injection bookkeeping, parameter counting and the adapter file format's errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM

from peftlab.errors import UserError
from peftlab.peft import (
    FORMATS,
    LoraConfig,
    LoraLinear,
    ParameterReport,
    adapter_parameters,
    adapter_state_dict,
    apply_lora,
    freeze_all_but_adapters,
    load_adapter,
    load_adapter_state_dict,
    parameter_report,
    parse_layers,
    replace_module,
    save_adapter,
    select_modules,
)
from peftlab.peft.core import split_patterns


@pytest.fixture
def llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.fixture
def t5(tiny_t5_dir):
    return AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()


def logits(model) -> torch.Tensor:
    ids = torch.randint(4, 300, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------
# select_modules


def test_suffix_exact_and_dotted_suffix(llama):
    assert select_modules(llama, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert select_modules(llama, "model.layers.1.mlp.up_proj") == ["model.layers.1.mlp.up_proj"]
    assert select_modules(llama, ["self_attn.o_proj"]) == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    # a suffix matches whole names only: "proj" is not a suffix of "q_proj" at a dot
    with pytest.raises(UserError, match="'proj' matches no layer"):
        select_modules(llama, ["proj"])


def test_comma_separated_patterns_are_split_as_on_the_command_line():
    assert split_patterns("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert split_patterns(" q_proj , v_proj, ") == ["q_proj", "v_proj"]
    assert split_patterns("q_proj") == ["q_proj"]
    assert split_patterns("all-linear") == ["all-linear"]
    assert split_patterns(r"re:.*layers\.\d{1,2}\.q_proj") == [r"re:.*layers\.\d{1,2}\.q_proj"]  # a regex's commas
    assert split_patterns(["a,b", "c"]) == ["a,b", "c"]  # a list is taken as is
    assert split_patterns(()) == [] and split_patterns(None) is None


def test_regex_is_a_full_match(llama):
    assert select_modules(llama, [r"re:.*layers\.1\.mlp\.(up|down)_proj"]) == [
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(UserError, match="matches no layer"):
        select_modules(llama, ["re:q_proj"])  # not the whole path
    with pytest.raises(UserError, match="not a valid regular expression"):
        select_modules(llama, ["q_proj"], exclude=["re:layers.[0"])


def test_all_linear_skips_the_output_head(llama, t5):
    paths = select_modules(llama, "all-linear")
    assert len(paths) == 2 * 7 and "lm_head" not in paths
    assert {p.rsplit(".", 1)[-1] for p in select_modules(t5, ["all-linear"])} == {
        "q", "k", "v", "o", "wi_0", "wi_1", "wo"
    }


def test_architecture_defaults(llama, t5):
    assert select_modules(llama, None) == [
        f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")
    ]
    assert {p.rsplit(".", 1)[-1] for p in select_modules(t5, None)} == {"q", "v"}
    assert len(select_modules(t5, None)) == 2 * 2 + 2 * 2 * 2  # encoder self-attn; decoder self- and cross-attn


def test_unknown_architecture_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UserError, match="no default target modules for model type None: pass targets"):
        select_modules(model, None)


def test_exclude_and_layers(llama, t5):
    assert select_modules(llama, "all-linear", exclude=["o_proj", "re:.*mlp.*"], layers="1") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    # T5 blocks are "block.N"; the encoder's and the decoder's block 0 both count as layer 0
    assert select_modules(t5, ["q"], layers=[0]) == [
        "encoder.block.0.layer.0.SelfAttention.q",
        "decoder.block.0.layer.0.SelfAttention.q",
        "decoder.block.0.layer.1.EncDecAttention.q",
    ]
    with pytest.raises(UserError, match="select no layer"):
        select_modules(llama, ["q_proj"], layers="5-7")


def test_parse_layers():
    assert parse_layers("0-3,6") == {0, 1, 2, 3, 6}
    assert parse_layers(" 2 ") == {2}
    assert parse_layers(4) == {4}
    assert parse_layers([1, 3]) == {1, 3}
    assert parse_layers(None) is None
    for bad in ("a", "1-", "3-1", "1,,2"):
        with pytest.raises(UserError, match="not a range spec"):
            parse_layers(bad)


def test_no_match_lists_existing_names(llama):
    with pytest.raises(UserError) as error:
        select_modules(llama, ["q_proj", "v_prj"])
    message = str(error.value)
    assert "'v_prj' matches no layer" in message and "\n" not in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message
    assert "model.layers.0.self_attn.q_proj" in message
    # peft's rule for adapter files: fine as long as one target matches
    assert select_modules(llama, ["q_proj", "v_prj"], strict=False) == select_modules(llama, ["q_proj"])


def test_injected_layers_are_not_selected_again(llama):
    apply_lora(llama, LoraConfig(rank=2, targets=["q_proj"]))
    paths = select_modules(llama, "all-linear")
    assert not any(p.endswith(("lora_A", "lora_B", "base_layer", "q_proj")) for p in paths)
    with pytest.raises(UserError, match="'q_proj' matches no layer"):
        apply_lora(llama, LoraConfig(rank=2, targets=["q_proj"]))


# ---------------------------------------------------------------------------------------------
# injection, freezing, adapter state dicts


def test_replace_module(llama):
    new = nn.Identity()
    old = replace_module(llama, "model.layers.0.mlp.down_proj", new)
    assert isinstance(old, nn.Linear) and llama.model.layers[0].mlp.down_proj is new


def test_adapter_state_dict_is_a_subset_of_the_state_dict(llama):
    apply_lora(llama, LoraConfig(rank=2, dora=True))
    adapter = adapter_state_dict(llama)
    state = llama.state_dict()
    assert len(adapter) == 4 * 3 and set(adapter) <= set(state)
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector" in adapter
    assert all(torch.equal(adapter[k], state[k]) for k in adapter)
    assert {n for n, p in llama.named_parameters() if p.requires_grad} == set(adapter)

    for p in llama.parameters():
        p.requires_grad_(True)
    freeze_all_but_adapters(llama)
    assert {n for n, p in llama.named_parameters() if p.requires_grad} == set(adapter)


def test_load_adapter_state_dict_is_strict(llama):
    apply_lora(llama, LoraConfig(rank=2))
    good = {k: torch.randn_like(v) for k, v in adapter_state_dict(llama).items()}
    load_adapter_state_dict(llama, good)
    assert all(torch.equal(adapter_state_dict(llama)[k], v) for k, v in good.items())

    key = "model.layers.1.self_attn.v_proj.lora_B.weight"
    with pytest.raises(UserError, match=rf"{key} has shape \(32, 3\) but the model's layer expects \(32, 2\)"):
        load_adapter_state_dict(llama, {**good, key: torch.zeros(32, 3)})
    with pytest.raises(UserError, match=r"no tensor for model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        load_adapter_state_dict(llama, {k: v for k, v in good.items() if k != key})
    with pytest.raises(UserError, match=r"adapter tensor model\.layers\.0\.mlp\.up_proj\.lora_A\.weight has no"):
        load_adapter_state_dict(llama, {**good, "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 64)})


# ---------------------------------------------------------------------------------------------
# parameter counting


def test_parameter_report_format():
    report = ParameterReport(trainable=1234, total=5678)
    assert str(report) == "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330"
    assert report.percent == pytest.approx(21.733004579)
    assert ParameterReport(0, 0).percent == 0.0


def test_parameter_report_counts_tied_weights_once():
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_lora(model, LoraConfig(rank=2))
    theirs = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    report = parameter_report(model)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()


# ---------------------------------------------------------------------------------------------
# adapter files: config contents and errors


def test_saved_config_is_what_peft_writes(llama, tmp_path):
    config = LoraConfig(rank=4, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"], rslora=True)
    save_adapter(apply_lora(llama, config), tmp_path, config, base_model_name_or_path="org/base")
    ours = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True,
        task_type="CAUSAL_LM", base_model_name_or_path="org/base", inference_mode=True,
    ).to_dict()
    assert set(ours) <= set(theirs)  # nothing peft would warn about
    for key, value in ours.items():
        expected = sorted(theirs[key]) if key == "target_modules" else theirs[key]
        expected = expected.value if hasattr(expected, "value") else expected  # enums
        assert value == expected, key
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == {
        f"base_model.model.model.layers.{i}.self_attn.{n}.lora_{ab}.weight"
        for i in (0, 1) for n in ("q_proj", "v_proj") for ab in "AB"
    }


def test_t5_task_type(t5, tmp_path):
    config = LoraConfig(rank=2)
    save_adapter(apply_lora(t5, config), tmp_path, config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


def test_load_for_training(llama, tiny_llama_dir, tmp_path):
    config = LoraConfig(rank=2)
    save_adapter(apply_lora(llama, config), tmp_path, config)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path, trainable=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_parameters(model))


def test_missing_folder_or_config(llama, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(llama, tmp_path / "nope")
    with pytest.raises(UserError, match="has no adapter_config.json"):
        load_adapter(llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(UserError, match="has no adapter_model.safetensors"):
        load_adapter(llama, tmp_path)


def test_pickle_refused_unless_trusted(tiny_llama_dir, tmp_path):
    theirs = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), peft.LoraConfig(r=2, target_modules=["q_proj"])
    ).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_()
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with pytest.raises(UserError, match="--trust-pickle"):
        load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, LoraLinear) for m in fresh.modules())  # refused before touching the model
    ours = load_adapter(fresh, tmp_path, trust_pickle=True)
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5


def test_shape_mismatch_names_the_tensor(llama, tiny_llama_dir, tmp_path):
    config = LoraConfig(rank=4)
    save_adapter(apply_lora(llama, config), tmp_path, config)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UserError) as error:
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path)
    assert str(error.value) == (
        "adapter tensor model.layers.1.self_attn.q_proj.lora_A.weight has shape (4, 48) but the model's layer "
        "expects (4, 64): was this adapter trained for another base model?"
    )


def test_wrong_base_model_is_detected(llama, t5, tmp_path):
    config = LoraConfig(rank=4, dora=True)
    save_adapter(apply_lora(llama, config), tmp_path, config)
    narrower = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(UserError, match=r"has shape \(4, 64\) but the model's layer expects \(4, 32\): was this"):
        load_adapter(narrower, tmp_path)
    with pytest.raises(UserError, match=r"select no layer of T5ForConditionalGeneration.*named q, k, v, o"):
        load_adapter(t5, tmp_path)


def test_unsupported_adapters(llama, tmp_path):
    config = LoraConfig(rank=2)
    save_adapter(apply_lora(llama, config), tmp_path, config)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for change, message in [
        ({"peft_type": "VBLORA"}, "adapter type 'VBLORA' .* is not supported: peftlab reads LORA"),
        ({"bias": "all"}, "uses peft's bias='all', which peftlab does not support"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"init_lora_weights": "corda"}, "init_lora_weights='corda'"),  # pissa and olora load (test_lora_init)
        ({"layers_to_transform": [0], "layers_pattern": "blocks"}, "layers_pattern"),
    ]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(UserError, match=message):
            load_adapter(llama, tmp_path)
    assert "LORA" in FORMATS
