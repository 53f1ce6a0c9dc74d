"""Export a model, its adapter merged in, as one GGUF file for llama.cpp and Ollama (``peftlab export``).

    peftlab export --model smollm2-135m-instruct --adapter runs/sum/final --out sum.gguf --type q8_0
    llama-cli -m sum.gguf -cnv        # or, in a Modelfile: FROM ./sum.gguf

What llama.cpp expects of a Llama-architecture file, and what we write (``gguf.GGUFWriter``):

* ``general.architecture = "llama"`` and the hyper-parameters under ``llama.*``: ``context_length``,
  ``embedding_length``, ``block_count``, ``feed_forward_length``, ``attention.head_count``,
  ``attention.head_count_kv``, ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``,
  ``rope.dimension_count`` (the head size) and ``vocab_size``; ``general.file_type`` says f32/f16/q8_0.
* Tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``output_norm``, ``output``:
  ``gguf.TensorNameMap`` holds the mapping from HF's), each stored as the HF ``(out, in)`` matrix, which
  GGUF lists as ``ne = [in, out]``. With tied embeddings there is no ``output.weight``: llama.cpp (and
  transformers' reader) then use ``token_embd`` for the output projection, as the HF model does.
* **The rotary permutation.** HF Llama applies RoPE by rotating the two *halves* of each head
  (``rotate_half``: dimension i pairs with i + d/2), while llama.cpp's ``rope`` rotates *adjacent* pairs
  (2i, 2i + 1), the layout of Meta's original checkpoints. HF's conversion script reordered the rows of
  ``q_proj`` and ``k_proj`` from adjacent pairs to halves; llama.cpp's ``convert_hf_to_gguf.py``
  (``LlamaModel.permute``) undoes it per head, and transformers' GGUF reader (``reverse_permute``) redoes
  it on load. Without it attention scores are wrong and logits do not match. ``k_proj`` is permuted
  per key/value head (grouped-query attention).
* The tokenizer as metadata (a GGUF has no ``tokenizer.json``): ``tokenizer.ggml.model = "gpt2"``
  (byte-level BPE), ``tokenizer.ggml.pre`` (the pre-tokenizer's split rule by llama.cpp's name for it),
  the tokens in id order with their types (normal, control for special tokens, user-defined for other
  added tokens, unused for padding rows of the embedding), the merges, the bos/eos/unk/pad ids, whether
  a BOS is added, and ``tokenizer.chat_template``.

Quantisation types: f32; f16 (matrices in f16); q8_0 (matrices in blocks of 32 with one f16 scale,
``gguf.quants``; a matrix whose rows are not a multiple of 32 stays f16). One-dimensional tensors (the
RMSNorm weights) stay f32 in every type, as llama.cpp's converter keeps them.

Only adapters that fold into the weights can be exported: the LoRA family (LoRA, rsLoRA, DoRA) and
(IA)^3. Bottleneck adapters, soft prompts and prefixes add computation that the Llama graph of
llama.cpp does not have. The file is written under a temporary name beside ``--out`` and renamed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from peftlab.errors import UserError
from peftlab.progress import ProgressFactory, silent

TYPES = ("f32", "f16", "q8_0")
MERGEABLE = {"LORA": "LoRA", "IA3": "(IA)^3"}
"""peft_type of the adapters that fold into the weights, and how to name them."""
_WHY_NOT = {
    "BOTTLENECK": "bottleneck adapters add layers",
    "PROMPT_TUNING": "a soft prompt adds virtual tokens before the input",
    "PREFIX_TUNING": "prefix tuning adds key/value prefixes to every attention layer",
    "SELECTIVE": "selective adapters replace chosen parameters (merge them with the model in Python and export that folder)",
}

# How a byte-level BPE splits text before merging, by llama.cpp's name for the rule (tokenizer.ggml.pre).
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class ExportResult:
    path: Path
    type: str
    tensors: int
    bytes: int
    adapter_type: str | None
    """The merged adapter's peft_type (LORA, IA3), None without an adapter."""
    kept_f16: list[str] = field(default_factory=list)
    """q8_0: matrices left in f16 because their rows are not a multiple of 32."""


# ---------------------------------------------------------------------------------------------
# Checks that need no model


def check_output(out: str | Path, inputs: list[Path], overwrite: bool) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--out {out} must be a .gguf file name")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'model.gguf'}")
    if any(p.exists() and out.resolve() == p.resolve() for p in inputs):
        raise UserError(f"--out {out} is one of the inputs; write the export to another file")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or choose another file")
    if not out.parent.is_dir():
        raise UserError(f"the folder of --out {out} does not exist; create {out.parent} first")
    return out


def check_adapter(adapter: str | Path) -> str:
    """The adapter's peft_type, if it merges into the weights; else a one-line refusal saying why."""
    from peftlab.peft.formats import read_adapter_config

    peft_type = read_adapter_config(adapter)["peft_type"]
    if peft_type not in MERGEABLE:
        why = _WHY_NOT.get(peft_type, "it is not a weight update")
        raise UserError(f"cannot export a {peft_type} adapter to GGUF: {why}, which llama.cpp's Llama graph has no "
                        f"place for; only LoRA/DoRA and (IA)^3 adapters merge into the weights")
    return peft_type


def check_architecture(config, name: str) -> None:
    """Llama-architecture causal LMs only, without features the llama.cpp Llama graph or this exporter lacks."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        kind = ", ".join(getattr(config, "architectures", None) or []) or model_type
        raise UserError(f"peftlab export writes Llama-architecture GGUF files; {name} is a {model_type} model ({kind})")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{name} uses {rope.get('rope_type', rope.get('type'))!r} RoPE scaling, which peftlab export "
                        "does not write yet")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UserError(f"{name} has {flag}=True, which peftlab export does not write yet")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"{name} uses the {config.hidden_act} activation; llama.cpp's Llama graph uses silu")


# ---------------------------------------------------------------------------------------------
# Tensors


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF q_proj/k_proj rows (per head: first half, second half) -> llama.cpp's (adjacent pairs).

    llama.cpp's ``LlamaModel.permute``; transformers' GGUF reader applies the inverse on load.
    """
    head_dim = weight.shape[0] // n_head
    w = weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])  # (heads, half, d/2, in)
    return w.swapaxes(1, 2).reshape(weight.shape)  # (heads, d/2, half, in): row 2i, 2i+1 = pair i


def _encode(data: np.ndarray, kind: str):
    """``(array, GGMLQuantizationType)`` for one tensor (float32 ``data``) of an export of type ``kind``."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if data.ndim <= 1 or kind == "f32":
        return data.astype(np.float32), Q.F32
    if kind == "f16" or data.shape[-1] % 32:  # q8_0 blocks are 32 consecutive values of a row
        return data.astype(np.float16), Q.F16
    return quantize(data, Q.Q8_0), Q.Q8_0


def gguf_tensors(model, kind: str) -> tuple[dict[str, tuple[np.ndarray, object]], list[str]]:
    """llama.cpp's tensor name -> (encoded array, its GGML type); and the matrices q8_0 left in f16."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, tuple[np.ndarray, object]] = {}
    kept_f16: list[str] = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"peftlab export does not know where the tensor {hf_name} goes in a Llama GGUF file")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = permute_rotary(data, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = permute_rotary(data, config.num_key_value_heads)
        array, qtype = _encode(data, kind)
        if kind == "q8_0" and data.ndim == 2 and qtype.name == "F16":
            kept_f16.append(name)
        out[name] = (array, qtype)
    return out, kept_f16


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer_name(state: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE's split rule, read from tokenizer.json."""
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    shape = [{k: v for k, v in s.items() if k != "trim_offsets"} for s in steps]
    if shape == [_GPT2_BYTE_LEVEL]:
        return "gpt2"
    if len(shape) == 2 and shape[0] == {"type": "Digits", "individual_digits": True} and shape[1] == _GPT2_BYTE_LEVEL:
        return "smollm"  # SmolLM's: each digit alone, then GPT-2's rule
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    raise UserError("the tokenizer splits text in a way peftlab export cannot name for llama.cpp "
                    "(it knows GPT-2's, SmolLM's and Llama 3's byte-level BPE)")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """What a GGUF file says about the tokenizer: tokens, types, merges, special ids, BOS, chat template."""
    from gguf import TokenType

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("peftlab export needs a fast (tokenizer.json) tokenizer to describe it in the GGUF file")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    if model.get("type") != "BPE" or state.get("normalizer") is not None:
        raise UserError(f"peftlab export writes byte-level BPE tokenizers (GPT-2 style, as Llama 3 and SmolLM use); "
                        f"this one is {model.get('type')}" + (" with a normalizer" if state.get("normalizer") else ""))
    pre = _pre_tokenizer_name(state)
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows of the embedding no token uses
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(TokenType.NORMAL)
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = {key: getattr(tokenizer, f"{key}_token_id") for key in ("bos", "eos", "unk", "pad")}
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "ids": {k: v for k, v in ids.items() if v is not None},
        "add_bos": ids["bos"] is not None and with_special[:1] == [ids["bos"]] and without[:1] != [ids["bos"]],
        "add_eos": ids["eos"] is not None and with_special[-1:] == [ids["eos"]] and without[-1:] != [ids["eos"]],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


# ---------------------------------------------------------------------------------------------
# Writing


def write_gguf(path: Path, model, tokenizer, kind: str, name: str) -> tuple[int, list[str]]:
    """Write the Llama GGUF file of ``model`` (adapter already merged) to ``path``; returns (tensors, kept f16)."""
    import gguf

    config = model.config
    tok = tokenizer_metadata(tokenizer, config.vocab_size)
    tensors, kept_f16 = gguf_tensors(model, kind)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
        writer.add_file_type(int(file_type))
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(float(rope_theta))
        writer.add_rope_dimension_count(head_dim)
        if head_dim * config.num_attention_heads != config.hidden_size:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(config.vocab_size)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for key, token_id in tok["ids"].items():
            adders[key](token_id)
        writer.add_add_bos_token(tok["add_bos"])
        writer.add_add_eos_token(tok["add_eos"])
        if tok["chat_template"]:
            writer.add_chat_template(tok["chat_template"])

        for tensor_name, (array, qtype) in tensors.items():
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return len(tensors), kept_f16


def merge_adapter(model, peft_type: str):
    """Fold the loaded adapter into the weights and remove its wrappers."""
    from peftlab.peft import adapter_modules, merge_and_unload
    from peftlab.peft.ia3 import merge_ia3_and_unload

    model = merge_ia3_and_unload(model) if peft_type == "IA3" else merge_and_unload(model)
    assert not adapter_modules(model), "adapter layers left after merging"
    return model


def export_gguf(model: str, out: str | Path, adapter: str | None = None, kind: str = "f16", *,
                trust_pickle: bool = False, overwrite: bool = False, progress: ProgressFactory = silent) -> ExportResult:
    """Merge ``adapter`` (if any) into ``model`` and write a llama.cpp GGUF file of type ``kind`` to ``out``."""
    from peftlab.models import load_model
    from peftlab.peft import load_adapter

    if kind not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)}, not {kind!r}")
    inputs = [Path(model).expanduser()]
    if adapter:
        inputs += [p for p in Path(adapter).glob("*") if p.is_file()]
    out = check_output(out, inputs, overwrite)
    peft_type = check_adapter(adapter) if adapter else None

    loaded = load_model(model, dtype="float32", device="cpu", progress=progress)
    check_architecture(loaded.model.config, model)
    net = loaded.model
    if adapter:
        net = merge_adapter(load_adapter(net, adapter, trust_pickle=trust_pickle), peft_type)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with torch.no_grad():
            count, kept_f16 = write_gguf(tmp, net, loaded.tokenizer, kind, name=Path(str(model)).name or str(model))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, kind, count, out.stat().st_size, peft_type, kept_f16)
