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
    pred, ref = tokenize(prediction, use_stemmer), tokenize(reference, use_stemmer)
    scores = {}
    for rouge_type in rouge_types:
        if rouge_type == "rougeL":
            scores[rouge_type] = _score_lcs(pred, ref)
        elif rouge_type == "rougeLsum":
            scores[rouge_type] = _score_lsum(
                _sentences(prediction, use_stemmer), _sentences(reference, use_stemmer)
            )
        else:
            n = int(rouge_type[5:])
            scores[rouge_type] = _score_ngrams(_ngrams(pred, n), _ngrams(ref, n))
    return scores


def tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's tokenizer: lowercase, split on non-``[a-z0-9]``, optionally Porter-stem."""
    tokens = _TOKEN.findall(text.lower())
    if use_stemmer:
        tokens = [_stem(t) if len(t) > 3 else t for t in tokens]
        tokens = [t for t in tokens if _TOKEN.fullmatch(t)]  # rouge-score re-checks after stemming
    return tokens


@lru_cache(maxsize=1 << 17)
def _stem(token: str) -> str:
    return _porter().stem(token)


@lru_cache(maxsize=1)
def _porter():
    from nltk.stem.porter import PorterStemmer  # imported on first use: nltk is slow to import

    return PorterStemmer()  # default mode NLTK_EXTENSIONS, as rouge-score uses


def _fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _score_ngrams(pred: Counter, ref: Counter) -> Score:
    hits = sum(min(count, pred[gram]) for gram, count in ref.items())
    precision = hits / max(sum(pred.values()), 1)
    recall = hits / max(sum(ref.values()), 1)
    return Score(precision, recall, _fmeasure(precision, recall))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986; Hyyro 2004).

    Bit i of ``v`` is 1 while row i of the classic DP table has not yet stepped up; for each token
    of ``b``, ``u = v & match(token)`` and ``v = (v + u) | (v - u)`` advance one column of the table
    in a few big-integer operations. The LCS is the number of bits of ``v`` that became 0.
    """
    match: dict[str, int] = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & match.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _score_lcs(pred: list[str], ref: list[str]) -> Score:
    if not pred or not ref:
        return Score(0.0, 0.0, 0.0)
    lcs = lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return Score(precision, recall, _fmeasure(precision, recall))


def _sentences(text: str, use_stemmer: bool) -> list[list[str]]:
    """Non-empty lines of ``text``, tokenized (a line of punctuation only gives an empty list)."""
    return [tokenize(line, use_stemmer) for line in text.split("\n") if line]


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """Indices into ``ref`` of one LCS: the one rouge-score's backtracking picks.

    The choice matters for ROUGE-Lsum, whose union of LCSs depends on which LCS each pair gives.
    """
    table = [[0] * (len(can) + 1) for _ in range(len(ref) + 1)]  # (|ref|+1, |can|+1)
    for i, r in enumerate(ref, 1):
        row, above = table[i], table[i - 1]
        for j, c in enumerate(can, 1):
            row[j] = above[j - 1] + 1 if r == c else max(above[j], row[j - 1])
    indices = []
    i, j = len(ref), len(can)
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            indices.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return indices[::-1]


def _score_lsum(pred_sents: list[list[str]], ref_sents: list[list[str]]) -> Score:
    """Summary-level LCS (Lin 2004, section 3.2) with ROUGE-1.5.5's guard against double counting."""
    num_pred, num_ref = sum(map(len, pred_sents)), sum(map(len, ref_sents))
    if not num_pred or not num_ref:
        return Score(0.0, 0.0, 0.0)
    left_pred = Counter(t for s in pred_sents for t in s)
    left_ref = Counter(t for s in ref_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union = sorted(set().union(*(_lcs_indices(ref, can) for can in pred_sents)))
        for token in (ref[i] for i in union):
            if left_pred[token] > 0 and left_ref[token] > 0:
                hits += 1
                left_pred[token] -= 1
                left_ref[token] -= 1
    precision, recall = hits / num_pred, hits / num_ref
    return Score(precision, recall, _fmeasure(precision, recall))
