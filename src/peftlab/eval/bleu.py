"""BLEU (Papineni et al., 2002): corpus BLEU via sacrebleu, and the course notes' sentence variant.

    BLEU = BP * exp( (1/N) * sum_{n=1..N} log p_n )
    p_n  = clipped n-gram matches / n-grams in the prediction   (clip: min(count_pred, count_ref))
    BP   = 1 if c > r else exp(1 - r / c)                        (c, r: prediction, reference lengths)

:func:`corpus_bleu` is sacrebleu's (13a tokenizer, exponential smoothing) divided by 100, the number
to report.
:func:`sentence_bleu` is the unsmoothed per-example form, on whitespace tokens, that the course
notes use: one zero precision makes the whole score 0.
"""

from __future__ import annotations

import math
from collections import Counter

from peftlab.errors import UserError


def corpus_bleu(predictions: list[str], references: list[str]) -> tuple[float, str]:
    """sacrebleu corpus BLEU on a 0-1 scale, and sacrebleu's signature (how to reproduce it)."""
    from sacrebleu.metrics import BLEU

    if len(predictions) != len(references):
        raise UserError(
            f"{len(predictions)} predictions but {len(references)} references: give one reference per prediction"
        )
    if not predictions:
        raise UserError("no predictions to score: give at least one prediction and reference")
    bleu = BLEU()
    result = bleu.corpus_score(list(predictions), [list(references)])
    # sacrebleu's exp(log 100) is 100.00000000000004 for a perfect match: clip that rounding into [0, 1]
    return min(result.score / 100, 1.0), str(bleu.get_signature())


def sentence_bleu(prediction: str, reference: str, max_order: int = 4) -> float:
    """Unsmoothed BLEU-``max_order`` of one prediction on whitespace tokens (0.0 if any p_n is 0).

    >>> round(sentence_bleu("I am very happy that I am drinking a warm cup of tea.",
    ...                     "I am very happy to say that I am drinking a warm cup of tea."), 3)
    0.73
    """
    if max_order < 1:
        raise UserError(f"max_order must be at least 1, got {max_order}")
    pred, ref = prediction.split(), reference.split()
    log_sum = 0.0
    for n in range(1, max_order + 1):
        pred_grams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
        ref_grams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        matches = sum(min(count, ref_grams[gram]) for gram, count in pred_grams.items())
        if matches == 0:  # also covers a prediction shorter than n tokens
            return 0.0
        log_sum += math.log(matches / sum(pred_grams.values()))
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * math.exp(log_sum / max_order)
