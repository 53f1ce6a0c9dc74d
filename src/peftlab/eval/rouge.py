"""ROUGE-N, ROUGE-L and ROUGE-Lsum, equal to Google's ``rouge-score`` 0.1.2 example by example.

Lin (2004), "ROUGE: A Package for Automatic Evaluation of Summaries". With ``r`` the reference
tokens and ``p`` the prediction tokens:

    ROUGE-N:    hits = sum over n-grams g of min(count_p(g), count_r(g))      (clipped counts)
                precision = hits / max(#n-grams(p), 1),  recall = hits / max(#n-grams(r), 1)
    ROUGE-L:    precision = LCS(r, p) / |p|,  recall = LCS(r, p) / |r|        (0 if either is empty)
    ROUGE-Lsum: texts split into sentences on "\\n"; for each reference sentence the union of its
                LCS with every predicted sentence counts as hits, each token at most as often as
                it occurs on both sides (as ROUGE-1.5.5 does); hits / total tokens.
    F1 = 2 P R / (P + R), or 0 when P + R = 0.

The LCSs are bit-parallel (``peftlab.eval._lcs``): ROUGE-Lsum picks, for every sentence pair,
the same LCS as rouge-score's table and backtracking, in a few big-integer operations per token
instead of a Python loop over every cell. Each text is tokenized once, line by line (the whole
text's tokens are the lines' tokens in order: a newline is a separator), and stems are cached.

Tokens follow rouge-score: lowercase, every run of characters outside ``[a-z0-9]`` is a separator
(accented letters included), and with ``use_stemmer`` the tokens longer than 3 characters go
through NLTK's Porter stemmer in its default (NLTK_EXTENSIONS) mode.

    >>> rouge("It is very cold outside", "It is cold outside.")["rouge1"].precision
    0.8
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from peftlab.errors import UserError
from peftlab.eval._lcs import PackedReference, lcs_length

__all__ = ["ROUGE_TYPES", "Score", "lcs_length", "rouge", "tokenize"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_TOKEN = re.compile(r"[a-z0-9]+")
_NGRAM_TYPE = re.compile(r"rouge([1-9])")


@dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    fmeasure: float


def rouge(
    prediction: str, reference: str, use_stemmer: bool = False, rouge_types=ROUGE_TYPES
) -> dict[str, Score]:
    """Score one prediction against one reference; returns ``{rouge_type: Score}``.

    ``rouge_types`` may hold ``rougeN`` (N in 1..9), ``rougeL`` and ``rougeLsum``.
    """
    for rouge_type in rouge_types:
        if rouge_type not in ("rougeL", "rougeLsum") and not _NGRAM_TYPE.fullmatch(rouge_type):
            raise UserError(f"unknown ROUGE type {rouge_type!r}: use rouge1..rouge9, rougeL or rougeLsum")
    pred_sents, ref_sents = _sentences(prediction, use_stemmer), _sentences(reference, use_stemmer)
    pred = [t for s in pred_sents for t in s]
    ref = [t for s in ref_sents for t in s]
    scores = {}
    for rouge_type in rouge_types:
        if rouge_type == "rougeL":
            scores[rouge_type] = _score_lcs(pred, ref)
        elif rouge_type == "rougeLsum":
            scores[rouge_type] = _score_lsum(pred_sents, ref_sents)
        else:
            n = int(rouge_type[5:])
            scores[rouge_type] = _score_ngrams(_ngrams(pred, n), _ngrams(ref, n))
    return scores


def tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's tokenizer: lowercase, split on non-``[a-z0-9]``, optionally Porter-stem."""
    tokens = _TOKEN.findall(text.lower())
    if use_stemmer:
        tokens = [stem for stem in map(_stem_token, tokens) if stem]
    return tokens


@lru_cache(maxsize=1 << 18)
def _stem_token(token: str) -> str:
    """Tokens longer than 3 characters go through Porter; rouge-score re-checks the result ("": dropped)."""
    if len(token) <= 3:
        return token
    stem = _porter().stem(token)
    return stem if _TOKEN.fullmatch(stem) else ""


@lru_cache(maxsize=1)
def _porter():
    from nltk.stem.porter import PorterStemmer  # imported on first use: nltk is slow to import

    return PorterStemmer()  # default mode NLTK_EXTENSIONS, as rouge-score uses


def _fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tokens) if n == 1 else Counter(zip(*(tokens[i:] for i in range(n))))


def _score_ngrams(pred: Counter, ref: Counter) -> Score:
    hits = sum(min(ref[gram], pred[gram]) for gram in ref.keys() & pred.keys())
    precision = hits / max(sum(pred.values()), 1)
    recall = hits / max(sum(ref.values()), 1)
    return Score(precision, recall, _fmeasure(precision, recall))


def _score_lcs(pred: list[str], ref: list[str]) -> Score:
    if not pred or not ref:
        return Score(0.0, 0.0, 0.0)
    lcs = lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return Score(precision, recall, _fmeasure(precision, recall))


def _sentences(text: str, use_stemmer: bool) -> list[list[str]]:
    """Non-empty lines of ``text``, tokenized (a line of punctuation only gives an empty list)."""
    return [tokenize(line, use_stemmer) for line in text.split("\n") if line]


def _score_lsum(pred_sents: list[list[str]], ref_sents: list[list[str]]) -> Score:
    """Summary-level LCS (Lin 2004, section 3.2) with ROUGE-1.5.5's guard against double counting.

    rouge-score walks each reference sentence's union positions, counting a token while both
    sides still have one left. Union positions are distinct reference positions, so token ``t``
    gets ``min(U_t, count_pred(t))`` hits, ``U_t`` being how many union positions hold ``t``.
    """
    num_pred, num_ref = sum(map(len, pred_sents)), sum(map(len, ref_sents))
    if not num_pred or not num_ref:
        return Score(0.0, 0.0, 0.0)
    packed = PackedReference(ref_sents)
    union = packed.union_lcs(pred_sents)
    left_pred = Counter(t for s in pred_sents for t in s)
    match = packed.reversed_match
    hits = sum(min((union & match[t]).bit_count(), left_pred[t]) for t in match.keys() & left_pred.keys())
    precision, recall = hits / num_pred, hits / num_ref
    return Score(precision, recall, _fmeasure(precision, recall))
