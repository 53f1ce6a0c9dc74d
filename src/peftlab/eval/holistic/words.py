"""Word lists and whole-word matching, shared by the perturbations and the bias and toxicity measures.

The lists live in ``peftlab/eval/lexicons/<name>.yaml`` (perturbations, bias, toxicity), each with
its ``name`` and ``version``, which the report names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from importlib import resources

import yaml


@functools.cache
def lexicon(name: str) -> dict:
    """A word list shipped in ``peftlab/eval/lexicons/<name>.yaml``."""
    path = resources.files("peftlab.eval") / "lexicons" / f"{name}.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def words_pattern(words: Sequence[str]) -> re.Pattern:
    """Whole words or phrases, case-insensitive; longer phrases first so they win over their parts."""
    alternatives = sorted({w.lower() for w in words}, key=len, reverse=True)
    return re.compile(r"(?<![\w'])(" + "|".join(re.escape(w) for w in alternatives) + r")(?![\w'])", re.IGNORECASE)


def match_case(source: str, replacement: str) -> str:
    if source.isupper() and len(source) > 1:
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement
