"""LoRA through the command line: train -> eval --adapter -> merge, peft reading our final/, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from peftlab.cli import main
from peftlab.config import TrainConfig
from peftlab.training.loop import train
from helpers import expect_error, losses, write_dialogues


@pytest.mark.parametrize("method,extra", [("lora", []), ("dora", []), ("lora", ["--rslora"])])
def test_lora_train_eval_merge(method, extra, tiny_model_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=32)
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(run), "--method", method,
            "--rank", "4", "--alpha", "8", "--max-steps", "12", "--batch-size", "8", "--lr", "1e-2", "--save-every", "6",
            "--device", "cpu", *extra]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trainable params:" in out and "trainable%:" in out
    trace = losses(run)
    assert trace[-1] < trace[0]
    final = run / "final"
    assert {p.name for p in final.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_dora"] == (method == "dora")
    assert config["use_rslora"] == ("--rslora" in extra)
    # checkpoints hold the adapter only
    ckpt = run / "checkpoints" / "step-000006" / "weights.safetensors"
    assert ckpt.stat().st_size < 1.2 * (final / "adapter_model.safetensors").stat().st_size
    model_file = next(tiny_model_dir.glob("*.safetensors"))
    assert ckpt.stat().st_size < model_file.stat().st_size / 3

    # peft reads the run's final/ and gives the logits of peftlab eval's model
    peft = pytest.importorskip("peft")
    seq2seq = (tiny_model_dir / "config.json").read_text().find('"t5"') >= 0
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(["Summarize: Tom meets Anna on Friday."], return_tensors="pt")
    if seq2seq:
        ids["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7]])
    reference = peft.PeftModel.from_pretrained(auto.from_pretrained(tiny_model_dir), final).eval()
    from peftlab.models import load_for_inference

    ours = load_for_inference(str(tiny_model_dir), str(final), "float32", "cpu").model
    with torch.no_grad():
        assert (reference(**ids).logits - ours(**ids).logits).abs().max() < 1e-5

    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(final), "--data", str(data),
                 "--out", str(tmp_path / "ev"), "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["adapter"] == str(final)

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(final), "--out", str(merged)]) == 0
    plain = auto.from_pretrained(merged).eval()
    with torch.no_grad():
        assert (plain(**ids).logits - ours(**ids).logits).abs().max() < 1e-4
    assert not any("lora" in name for name, _ in plain.named_parameters())


def test_lora_resume_is_exact(tiny_llama_dir, tmp_path):
    from test_training import _Interrupt
    from safetensors.torch import load_file

    data = write_dialogues(tmp_path / "d.jsonl", n=24)
    common = dict(model=str(tiny_llama_dir), data=str(data), method="lora", rank=4, dropout=0.1, max_steps=6,
                  batch_size=4, lr=5e-3, save_every=2, device="cpu")
    straight = train(TrainConfig(out=str(tmp_path / "a"), **common))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "b"), **common), progress=_Interrupt(at=3))
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=True, **common))
    a = load_file(straight.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # dropout RNG restored too


def test_lora_user_errors(tiny_llama_dir, tiny_t5_dir, tmp_path, capsys):
    data = write_dialogues(tmp_path / "d.jsonl", n=12)
    base = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--max-steps", "1", "--method", "lora"]
    err = expect_error(base + ["--targets", "query_key"], capsys)
    assert "q_proj" in err  # lists the module names that exist
    assert "rank" in expect_error(base + ["--rank", "0"], capsys)
    assert "--rank 32" in expect_error(base + ["--rank", "500"], capsys)

    run = tmp_path / "run"
    assert main(base[:6] + [str(run)] + base[7:]) == 0
    capsys.readouterr()
    ev = ["eval", "--data", str(data), "--out", str(tmp_path / "ev"), "--device", "cpu"]
    from safetensors.torch import load_file, save_file

    # an adapter whose tensor shapes do not fit the model: the error names the tensor
    tensors = load_file(run / "final" / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :10].contiguous()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((run / "final" / "adapter_config.json").read_text())
    save_file(tensors, wrong / "adapter_model.safetensors")
    err = expect_error(ev + ["--model", str(tiny_llama_dir), "--adapter", str(wrong)], capsys)
    assert key.removeprefix("base_model.model.") in err or key in err
    # an adapter for another architecture: its target modules do not exist there
    assert "q_proj" in expect_error(ev + ["--model", str(tiny_t5_dir), "--adapter", str(run / "final")], capsys)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((run / "final" / "adapter_config.json").read_text())
    torch.save(load_file(run / "final" / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    assert "--trust-pickle" in expect_error(ev + ["--model", str(tiny_llama_dir), "--adapter", str(pickled)], capsys)
    capsys.readouterr()
    assert main(ev + ["--model", str(tiny_llama_dir), "--adapter", str(pickled), "--trust-pickle", "--max-new-tokens", "4"]) == 0


@pytest.mark.slow
def test_lora_on_the_embedded_model(embedded_model_dir, tmp_path):
    """r=8 on q,v: the run trains, final/ is under 2 MB, and the parameter report equals peft's."""
    peft = pytest.importorskip("peft")
    result = train(TrainConfig(model=str(embedded_model_dir), data="demo:dialogsum", out=str(tmp_path / "r"),
                               method="lora", rank=8, alpha=16, targets="q_proj,v_proj", max_steps=2, batch_size=2,
                               limit=4, eval_limit=2, device="cpu"))
    assert all(0 < x < 10 for x in losses(result.run_dir))
    size = sum(p.stat().st_size for p in result.final_dir.iterdir())
    assert size < 2_000_000, size
    reference = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(embedded_model_dir),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainable, total = reference.get_nb_trainable_parameters()
    ours = result.parameters
    assert (ours["trainable"], ours["total"]) == (trainable, total)
    assert ours["line"] == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                            f"trainable%: {100 * trainable / total:.4f}")
