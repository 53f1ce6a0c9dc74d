"""BLEU: corpus BLEU equals sacrebleu; the sentence variant matches the course notes and NLTK."""

from __future__ import annotations

import random
import warnings

import pytest
import sacrebleu
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

from peftlab.errors import UserError
from peftlab.eval.bleu import corpus_bleu, sentence_bleu
from peftlab.eval.score import score

REFERENCE = "I am very happy to say that I am drinking a warm cup of tea."


def test_course_notes_examples():
    assert round(sentence_bleu("I am very happy that I am drinking a cup of tea.", REFERENCE), 3) == 0.495
    assert round(sentence_bleu("I am very happy that I am drinking a warm cup of tea.", REFERENCE), 3) == 0.730


def test_course_notes_third_example():
    """The notes give 0.798 for "... I’m drinking a warm tea.": that is the score of "I am" spelled
    out; with "I’m" as one whitespace token the 1..4-gram precisions are 11/12, 8/11, 6/10, 4/9."""
    assert round(sentence_bleu("I am very happy to say that I’m drinking a warm tea.", REFERENCE), 3) == 0.506
    assert round(sentence_bleu("I am very happy to say that I am drinking a warm tea.", REFERENCE), 3) == 0.798


def test_zero_when_any_precision_is_zero():
    assert sentence_bleu("I am very", REFERENCE) == 0.0  # no 4-grams at all
    assert sentence_bleu("tea cup warm a", REFERENCE) == 0.0  # unigrams match, no bigram does
    assert sentence_bleu("", REFERENCE) == 0.0
    assert sentence_bleu(REFERENCE, REFERENCE) == 1.0
    assert sentence_bleu("I am", "I am", max_order=2) == 1.0


def _random_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    vocab = "the a cat dog sat on mat and was is happy tea cup warm , . I".split()
    pairs = []
    for _ in range(count):
        reference = [rng.choice(vocab) for _ in range(rng.randint(4, 25))]
        prediction = [w for w in reference if rng.random() > 0.2]
        prediction += [rng.choice(vocab) for _ in range(rng.randint(0, 4))]
        pairs.append((" ".join(prediction), " ".join(reference)))
    return pairs


@pytest.mark.parametrize("max_order", [1, 2, 4])
def test_sentence_bleu_matches_nltk_unsmoothed(max_order):
    weights = (1 / max_order,) * max_order
    nonzero = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns about zero counts; it then returns ~0
        for prediction, reference in _random_pairs(300):
            expected = nltk_sentence_bleu([reference.split()], prediction.split(), weights=weights)
            ours = sentence_bleu(prediction, reference, max_order=max_order)
            assert ours == pytest.approx(expected, abs=1e-12, rel=1e-12), (prediction, reference)
            nonzero += ours > 0
    assert nonzero > 100


def test_corpus_bleu_equals_sacrebleu():
    pairs = _random_pairs(50, seed=1) + [("Hello, World!", "hello world"), ("", "not empty"), ("a\nb c", "a b c")]
    predictions, references = map(list, zip(*pairs))
    score, signature = corpus_bleu(predictions, references)
    expected = sacrebleu.corpus_bleu(predictions, [references])
    assert 0 < score < 1
    assert score == pytest.approx(expected.score / 100, abs=1e-12)
    metric = sacrebleu.metrics.BLEU()
    metric.corpus_score(predictions, [references])
    assert signature == str(metric.get_signature())
    assert "nrefs:1" in signature and "tok:13a" in signature and f"version:{sacrebleu.__version__}" in signature


def test_perfect_match_is_exactly_one():
    """sacrebleu's exp(log 100) gives 100.00000000000004 for a perfect match; on the 0-1 scale that is 1."""
    for text in ["the cat sat on the mat", "a b c d e"]:
        assert sacrebleu.corpus_bleu([text], [[text]]).score / 100 > 1
        assert corpus_bleu([text], [text])[0] == 1.0
        assert score([text], [text]).aggregate["bleu"] == 1.0


def test_corpus_bleu_errors():
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(UserError, match="no predictions"):
        corpus_bleu([], [])
    with pytest.raises(UserError, match="max_order"):
        sentence_bleu("a", "a", max_order=0)
