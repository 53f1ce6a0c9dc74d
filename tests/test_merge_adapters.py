"""peftlab merge-adapters against peft's add_weighted_adapter: same tensors, same masks, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import peftlab
from peftlab.cli import main
from peftlab.config import ADAPTER_COMBINATIONS, SPARSIFYING_COMBINATIONS
from peftlab.models import load_model, load_structure
from peftlab.peft import load_adapter
from peftlab.peft.merge import COMBINATIONS, SPARSIFYING, combine_adapters, read_lora

peft = pytest.importorskip("peft")

# name -> (rank, which targets): a and b share q but differ in their second target
ADAPTERS = {"a": (4, 0), "b": (4, 1), "c": (6, 1)}
TARGETS = {"llama": (["q_proj", "v_proj"], ["q_proj", "k_proj"]), "t5": (["q", "v"], ["q", "k"])}

# (adapters, combination, weights, density, seed)
CASES = [
    ("ab", "linear", [0.6, -0.4], None, 0),
    ("ac", "cat", [0.6, 0.4], None, 0),
    ("ac", "svd", [1.0, 0.5], None, 0),
    ("ab", "ties", [0.6, 0.4], 0.5, 0),
    ("ab", "dare_linear", [0.6, 0.4], 0.5, 3),
    ("ab", "dare_ties", [0.7, 1.0], 0.5, 4),
    ("abc", "cat", [1.0, 1.0, 1.0], None, 0),
    ("c", "svd", [0.5], None, 0),  # one adapter: peft combines it linear, whatever was asked
]


def _auto(kind):
    return AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM


def _save_random_lora(base_dir, kind, folder, rank, targets, seed, rslora=False):
    """A peft LoRA adapter with random, non-zero A and B."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_rslora=rslora)
    model = peft.get_peft_model(_auto(kind).from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "t5"])
def family(request, tiny_llama_dir, tiny_t5_dir, tmp_path_factory):
    """(kind, base folder, {name: adapter folder}) for one tiny model."""
    kind = request.param
    base = {"llama": tiny_llama_dir, "t5": tiny_t5_dir}[kind]
    folder = tmp_path_factory.mktemp(f"merge-{kind}")
    adapters = {name: _save_random_lora(base, kind, folder / name, rank, TARGETS[kind][which], seed=i + 1)
                for i, (name, (rank, which)) in enumerate(ADAPTERS.items())}
    return kind, base, adapters


def _inputs(kind, base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(["Summarize: Tom meets Anna on Friday."], return_tensors="pt")
    if kind == "t5":
        ids["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7]])
    return ids


def _peft_combined(kind, base, adapters, names, combination, weights, density, seed):
    """peft's own result: the model holding the inputs and the combined adapter "new", active."""
    model = peft.PeftModel.from_pretrained(_auto(kind).from_pretrained(base), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    torch.manual_seed(seed)
    model.add_weighted_adapter(list(names), weights, "new", combination_type=combination, density=density)
    model.set_adapter("new")
    return model.eval()


def _new_tensors(model) -> dict[str, torch.Tensor]:
    """The combined adapter's tensors under the keys of an adapter file."""
    return {k.replace(".new.", "."): v for k, v in model.state_dict().items() if ".new." in k}


def _deltas(tensors: dict[str, torch.Tensor], scaling: float = 1.0) -> dict[str, torch.Tensor]:
    return {k.removesuffix(".lora_A.weight"): scaling * tensors[k.replace("lora_A", "lora_B")] @ v
            for k, v in tensors.items() if k.endswith("lora_A.weight")}


@pytest.mark.parametrize("names,combination,weights,density,seed", CASES,
                         ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_equal_to_peft_add_weighted_adapter(family, names, combination, weights, density, seed, tmp_path):
    kind, base, adapters = family
    reference = _peft_combined(kind, base, adapters, names, combination, weights, density, seed)
    out = peftlab.merge_adapters(model=str(base), adapter=[f"{n}={adapters[n]}" for n in names],
                                 out=str(tmp_path / "m"), combination=combination, weights=weights, density=density,
                                 seed=seed)

    ours, theirs = load_file(out / "adapter_model.safetensors"), _new_tensors(reference)
    assert ours.keys() == theirs.keys()
    ours_delta, theirs_delta = _deltas(ours), _deltas(theirs)
    for key in ours_delta:
        assert torch.allclose(ours_delta[key], theirs_delta[key], atol=1e-6, rtol=1e-5), key
    if combination != "svd":  # deterministic: the very tensors (svd's are equal up to the signs of singular vectors)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((out / "adapter_config.json").read_text())
    new = reference.peft_config["new"]
    assert (config["r"], config["lora_alpha"]) == (new.r, new.lora_alpha)
    assert set(config["target_modules"]) == set(new.target_modules)
    record = json.loads((out / "merge.json").read_text())
    assert record["combination"] == ("linear" if len(names) == 1 else combination) and record["seed"] == seed

    # the written adapter, loaded by peft and by peftlab, gives the logits of peft's combined adapter
    ids = _inputs(kind, base)
    loaded = peft.PeftModel.from_pretrained(_auto(kind).from_pretrained(base), out).eval()
    mine = load_adapter(load_model(str(base)).model, out).eval()
    with torch.no_grad():
        expected = reference(**ids).logits
        tolerance = 1e-6 * expected.abs().max()
        assert (loaded(**ids).logits - expected).abs().max() < tolerance
        assert (mine(**ids).logits - expected).abs().max() < tolerance
        with reference.disable_adapter():
            assert (expected - reference(**ids).logits).abs().max() > 1e-2  # the combined adapter does change the model


def test_dare_masks_follow_the_seed(family):
    kind, base, adapters = family
    structure = load_structure(str(base))
    inputs = [read_lora(n, adapters[n]) for n in "ab"]
    one, same, other = (combine_adapters(structure, inputs, [1.0, 1.0], "dare_ties", 0.5, seed=seed).tensors
                        for seed in (1, 1, 2))
    assert all(torch.equal(one[k], same[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)


def test_cat_is_exact_and_rslora_inputs_give_plain_lora(tiny_llama_dir, tmp_path):
    """cat: B A = sum w_i s_i B_i A_i; with rsLoRA inputs too, but the new adapter is plain LoRA (scaling 1):
    peft 0.21 copies use_rslora from the first adapter, which scales its result by sqrt(r) (huggingface/peft#3449)."""
    a = _save_random_lora(tiny_llama_dir, "llama", tmp_path / "a", 4, ["q_proj"], seed=1, rslora=True)
    b = _save_random_lora(tiny_llama_dir, "llama", tmp_path / "b", 2, ["q_proj", "v_proj"], seed=2)
    inputs = [read_lora("a", a), read_lora("b", b)]
    combined = combine_adapters(load_structure(str(tiny_llama_dir)), inputs, [0.5, -2.0], "cat")
    assert combined.config["use_rslora"] is False and combined.config["r"] == combined.config["lora_alpha"] == 6
    for path, delta in _deltas(combined.tensors).items():
        path = path.removeprefix("base_model.model.")
        expected = sum(w * x.lora.scaling * B @ A for x, w in zip(inputs, [0.5, -2.0])
                       if path in x.factors for A, B in [x.factors[path]])
        assert torch.allclose(delta, expected, atol=1e-6)
    assert inputs[0].lora.scaling == 8 / 2  # alpha / sqrt(r)

    reference = _peft_combined("llama", tiny_llama_dir, {"a": a, "b": b}, "ab", "cat", [0.5, -2.0], None, 0)
    theirs = _new_tensors(reference)
    assert theirs.keys() == combined.tensors.keys() and all(torch.equal(combined.tensors[k], theirs[k]) for k in theirs)
    assert reference.peft_config["new"].use_rslora  # the same A and B, which peft 0.21 then scales by sqrt(6), not 1


def test_targets_peft_cannot_unite_are_refused(tiny_llama_dir, tmp_path):
    from peftlab.errors import UserError
    from peftlab.peft import LoraConfig, apply_lora, save_adapter

    def lora(name, **options):
        config = LoraConfig(rank=2, **options)
        return save_adapter(apply_lora(load_model(str(tiny_llama_dir)).model, config), tmp_path / name, config)

    structure = load_structure(str(tiny_llama_dir))
    # peft takes layers_to_transform from the first adapter: the union would drop b's layer-1 v_proj
    first_block = read_lora("a", lora("a", targets="q_proj", layers="0"))
    everywhere = read_lora("b", lora("b", targets="v_proj"))
    with pytest.raises(UserError, match="miss model.layers.1.self_attn.v_proj"):
        combine_adapters(structure, [first_block, everywhere], [1.0, 1.0], "cat")
    assert combine_adapters(structure, [everywhere, everywhere], [1.0, 1.0], "cat").rank == 4
    # a list of names and a regex: peft refuses to unite them
    regex = read_lora("r", lora("r", targets="q_proj,v_proj", exclude="model.layers.0.self_attn.q_proj"))
    assert isinstance(regex.config["target_modules"], str)
    with pytest.raises(UserError, match="list of names in some and a regex in others"):
        combine_adapters(structure, [everywhere, regex], [1.0, 1.0], "cat")


def test_the_command_line(tiny_llama_dir, tmp_path, capsys):
    a = _save_random_lora(tiny_llama_dir, "llama", tmp_path / "a", 4, ["q_proj", "v_proj"], seed=1)
    b = _save_random_lora(tiny_llama_dir, "llama", tmp_path / "b", 2, ["q_proj", "v_proj"], seed=2)
    out = tmp_path / "merged"
    args = ["merge-adapters", "--model", str(tiny_llama_dir), "--adapter", f"sum={a}", "--adapter", f"qa={b}",
            "--combination", "cat", "--weights", "0.6,0.4", "--out", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"cat of 2 adapters, rank 6: {out}"
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "merge.json"}
    record = json.loads((out / "merge.json").read_text())
    assert [x["name"] for x in record["adapters"]] == ["sum", "qa"] and record["weights"] == [0.6, 0.4]
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(args[:-6] + ["--combination", "svd", "--out", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == f"svd of 2 adapters, rank 4: {out}"
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_the_combinations_are_the_configs():
    assert COMBINATIONS == ADAPTER_COMBINATIONS and SPARSIFYING == SPARSIFYING_COMBINATIONS
