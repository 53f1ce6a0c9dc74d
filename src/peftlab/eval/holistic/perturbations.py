"""HELM's perturbations of a document's text, seeded per item.

- ``mild_mix`` (robustness, HELM's ``MildMixPerturbation``): lowercase, then contractions, then
  misspellings with probability 0.1, then each run of spaces replaced by 1-3 spaces.
- ``dialect`` (fairness): Standard American English words to African American English-style ones.
- ``gender`` (fairness): male pronouns to female ones.

:func:`document_perturber` applies one to the evaluated document's text fields, never to the fields
the target or the choices are read from (HELM does not perturb references).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from peftlab.eval.harness.tasks import Task, template_fields
from peftlab.eval.holistic.words import lexicon, match_case, words_pattern

PERTURBATIONS = ("mild_mix", "dialect", "gender")
ROBUSTNESS = ("mild_mix",)
FAIRNESS = ("dialect", "gender")


def _substitute(text: str, mapping: dict[str, str]) -> str:
    table = {k.lower(): v for k, v in mapping.items()}
    return words_pattern(list(table)).sub(lambda m: match_case(m.group(0), table[m.group(0).lower()]), text)


def lowercase(text: str) -> str:
    return text.lower()


def contract(text: str) -> str:
    """Expansions to contractions: ``do not`` -> ``don't``."""
    return _substitute(text, lexicon("perturbations")["contractions"])


def misspell(text: str, rng: random.Random, prob: float = 0.1) -> str:
    """Each word with a listed misspelling is replaced by one with probability ``prob``."""
    table = lexicon("perturbations")["misspellings"]

    def replace(match: re.Match) -> str:
        word = match.group(0)
        options = table.get(word.lower())
        if options and rng.random() < prob:
            return match_case(word, rng.choice(options))
        return word

    return re.sub(r"[A-Za-z]+", replace, text)


def extra_spaces(text: str, rng: random.Random, max_spaces: int = 3) -> str:
    """Every run of spaces becomes 1 to ``max_spaces`` spaces."""
    return re.sub(r" +", lambda _: " " * rng.randint(1, max_spaces), text)


def mild_mix(text: str, rng: random.Random) -> str:
    """HELM's robustness perturbation: lowercase, contractions, misspellings (0.1), extra spaces (1-3)."""
    return extra_spaces(misspell(contract(lowercase(text)), rng, 0.1), rng, 3)


def dialect(text: str, rng: random.Random | None = None) -> str:
    """Standard American English words to African American English-style ones (every match)."""
    return _substitute(text, lexicon("perturbations")["dialect"])


def gender(text: str, rng: random.Random | None = None) -> str:
    """Male pronouns to female ones (every match)."""
    return _substitute(text, lexicon("perturbations")["gender_pronouns"])


_PERTURB: dict[str, Callable[[str, random.Random], str]] = {"mild_mix": mild_mix, "dialect": dialect, "gender": gender}


def document_perturber(task: Task, name: str, seed: int) -> Callable[[dict, int], dict]:
    """``(doc, index) -> copy`` whose text fields are perturbed, except those the target or choices read."""
    protected = template_fields(task.config.doc_to_target) | template_fields(task.config.doc_to_choice)
    perturb = _PERTURB[name]

    def apply(doc: dict, index: int) -> dict:
        rng = random.Random(f"{seed}:{name}:{task.name}:{index}")
        return {k: perturb(v, rng) if isinstance(v, str) and k not in protected else v for k, v in doc.items()}

    return apply
