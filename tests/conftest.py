"""Shared fixtures: tiny model folders (built once per session) and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import save_tiny  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return save_tiny("t5", tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(params=["llama", "t5"])
def tiny_model_dir(request, tiny_llama_dir, tiny_t5_dir) -> Path:
    """Each test using this runs once on the Llama-style and once on the T5-style tiny model."""
    return {"llama": tiny_llama_dir, "t5": tiny_t5_dir}[request.param]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real evaluation data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once per test session into an HF folder.

    Use it as ``load_model(str(embedded_model_dir))`` (a fraction of a second per load).
    """
    from peftlab.models import convert_gguf, embedded_gguf_path

    return convert_gguf(embedded_gguf_path(), tmp_path_factory.mktemp("embedded") / "smollm2-135m-instruct")
