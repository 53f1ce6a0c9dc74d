"""ROUGE parity with Google's rouge-score 0.1.2, example by example, and the course notes' examples."""

from __future__ import annotations

import json
import random

import pytest
from rouge_score import rouge_scorer

from peftlab.errors import UserError
from peftlab.eval._lcs import PackedReference
from peftlab.eval.rouge import ROUGE_TYPES, Score, lcs_length, rouge, tokenize

WORDS = (
    "a an I it is be to of on in at up go the cat cats dog dogs running runs ran run happily happy "
    "happiness generalization generalizations connected connecting connection relational conditional "
    "agreed agreement feed fed sky skies was has is are being tea cup warm cold outside summary "
    "summaries summarize summarizing dialogue dialogues person1 Person2 2021 3 42 3.14 1,000 "
    "well-known state-of-the-art don't I'm it's o'clock café naïve résumé Ångström straße über "
    "Zürich 東京 наука ñandú ï ÉCOLE school schooling meeting meetings yes no OK ok e-mail U.S.A."
).split()
PUNCT = [".", ",", "!", "?", ";", ":", "...", " - ", " -- ", "(", ")", '"', "'", "#", "@", "&", "/", "’"]


def _sentence(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(0, 12)):
        word = rng.choice(WORDS)
        word = rng.choice([word, word, word.lower(), word.upper(), word.capitalize()])
        if words and rng.random() < 0.15:
            word = words[-1]  # repeated words exercise clipping
        words.append(word)
        if rng.random() < 0.15:
            words.append(rng.choice(PUNCT))
    return rng.choice([" ", "  ", " \t"]).join(words)


def _text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.06:
        return rng.choice(["", " ", "\n", "...", "\n\n", "!?"])
    sentences = [_sentence(rng) for _ in range(rng.choice([1, 1, 2, 3, 5]))]
    return rng.choice(["\n", "\n", "\n\n", " \n", "\r\n", ". "]).join(sentences)


def _mutate(text: str, rng: random.Random) -> str:
    """A prediction that shares part of the reference, so every score lands away from 0 and 1."""
    tokens = text.replace("\n", " \n ").split(" ")
    out = []
    for token in tokens:
        r = rng.random()
        if r < 0.15:
            continue
        if r < 0.25:
            out.append(rng.choice(WORDS))
        out.append(token.lower() if rng.random() < 0.2 else token)
        if r > 0.95:
            out.append(token)
    if len(out) > 3 and rng.random() < 0.3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    lines = " ".join(out).replace(" \n ", "\n").split("\n")
    if rng.random() < 0.4:
        rng.shuffle(lines)  # reordered sentences: where ROUGE-Lsum and ROUGE-L part ways
    return "\n".join(lines)


def _pairs(count: int, seed: int = 1234) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = [("", ""), ("", "a reference"), ("a prediction", ""), ("\n", "x\n\ny"), ("...", "!!!")]
    while len(pairs) < count:
        reference = _text(rng)
        prediction = _mutate(reference, rng) if rng.random() < 0.8 else _text(rng)
        pairs.append((prediction, reference) if rng.random() < 0.5 else (reference, prediction))
    return pairs


PAIRS = _pairs(600)


def _assert_equal(ours: dict[str, Score], theirs, context) -> None:
    assert list(ours) == list(theirs), context
    for rouge_type, score in theirs.items():
        mine = ours[rouge_type]
        for measure in ("precision", "recall", "fmeasure"):
            assert getattr(mine, measure) == pytest.approx(getattr(score, measure), abs=1e-9, rel=0), (
                rouge_type,
                measure,
                context,
            )


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_parity_with_rouge_score_on_generated_pairs(use_stemmer):
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    distinct_l_lsum = nonzero_bigram = partial = 0
    for prediction, reference in PAIRS:
        theirs = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        ours = rouge(prediction, reference, use_stemmer=use_stemmer)
        _assert_equal(ours, theirs, (prediction, reference))
        distinct_l_lsum += theirs["rougeL"].fmeasure != theirs["rougeLsum"].fmeasure
        nonzero_bigram += theirs["rouge2"].fmeasure > 0
        partial += 0 < theirs["rouge1"].fmeasure < 1
    # The generator must exercise what it claims: sentence splits, shared bigrams, partial overlap.
    assert distinct_l_lsum > 80 and nonzero_bigram > 300 and partial > 300


def test_generated_pairs_cover_the_hard_cases():
    texts = [t for pair in PAIRS for t in pair]
    assert sum(t == "" for t in texts) >= 5
    assert sum("\n" in t for t in texts) > 200
    for needle in ("-", "'", "é", "3", "..."):
        assert sum(needle in t for t in texts) > 20, needle
    assert any(t != t.lower() for t in texts)
    # Stemming must change some tokens, otherwise the stemmed parity run proves nothing.
    changed = sum(tokenize(t, True) != tokenize(t) for t in texts)
    assert changed > 200


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_parity_on_real_dialogsum(shared_data, use_stemmer):
    """Summaries (one line) against dialogues (one turn per line) and against the next summary."""
    rows = [json.loads(line) for line in (shared_data / "dialogsum" / "dev.jsonl").open(encoding="utf-8")][:60]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    for row, following in zip(rows, rows[1:]):
        for prediction, reference in [(row["summary"], row["dialogue"]), (following["summary"], row["summary"])]:
            _assert_equal(rouge(prediction, reference, use_stemmer), scorer.score(reference, prediction), row["fname"])


def test_other_ngram_orders_and_subsets():
    scorer = rouge_scorer.RougeScorer(["rouge3", "rougeLsum"], use_stemmer=True)
    for prediction, reference in PAIRS[:100]:
        ours = rouge(prediction, reference, True, rouge_types=("rouge3", "rougeLsum"))
        _assert_equal(ours, scorer.score(reference, prediction), (prediction, reference))


def test_lcs_length_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 150))]  # past 64 tokens: multi-word ints
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 150))]
        assert lcs_length(a, b) == rouge_scorer._lcs_table(a, b)[-1][-1]


def test_union_lcs_picks_rouge_scores_positions():
    """Every reference sentence's union of LCS positions equals rouge-score's (table + backtracking).

    Few distinct tokens make many LCSs of equal length, so a different tie-break would show; empty
    sentences and sentences past 64 tokens (several machine words) are included.
    """
    rng = random.Random(7)
    for trial in range(300):
        alphabet = "abcdefgh"[: rng.randint(1, 8)]
        sizes = [0, 1, 3, 12, 40, 90] if trial % 10 == 0 else list(range(0, 25))

        def sentences(count):
            return [[rng.choice(alphabet) for _ in range(rng.choice(sizes))] for _ in range(count)]

        refs, cans = sentences(rng.randint(1, 6)), sentences(rng.randint(1, 6))
        packed = PackedReference(refs)
        expected = [rouge_scorer._find_union([rouge_scorer.lcs_ind(r, c) for c in cans]) for r in refs]
        assert packed.positions(packed.union_lcs(cans)) == expected, (refs, cans)


def test_long_multi_line_texts_equal_rouge_score():
    """Dialogue-length texts (hundreds of tokens, dozens of lines), as the bench scores them."""
    rng = random.Random(3)
    lines = [_sentence(rng) for _ in range(400)]
    scorer = {stem: rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem) for stem in (False, True)}
    for _ in range(6):
        reference = "\n".join(rng.sample(lines, 30))
        prediction = _mutate(reference, rng) if rng.random() < 0.5 else "\n".join(rng.sample(lines, 25))
        for stem in (False, True):
            _assert_equal(rouge(prediction, reference, stem), scorer[stem].score(reference, prediction), stem)


def test_course_notes_worked_example():
    """The notes' LCS of 2 is wrong: "it is cold outside" is a common subsequence of length 4."""
    scores = rouge("It is very cold outside", "It is cold outside.")
    assert scores["rouge1"].recall == 1.0
    assert scores["rouge1"].precision == pytest.approx(0.8)
    assert round(scores["rouge1"].fmeasure, 3) == 0.889
    assert round(scores["rouge2"].fmeasure, 3) == 0.571
    assert lcs_length(tokenize("It is cold outside."), tokenize("It is very cold outside")) == 4
    assert round(scores["rougeL"].fmeasure, 3) == 0.889


def test_clipping_repeated_words():
    scores = rouge("cold cold cold cold", "It is cold outside.")
    assert scores["rouge1"].precision == pytest.approx(0.25)
    assert scores["rouge1"].recall == pytest.approx(0.25)


def test_stemming_matches_inflections():
    assert rouge("running cats", "run cat", use_stemmer=True)["rouge1"].fmeasure == 1.0
    assert rouge("running cats", "run cat")["rouge1"].fmeasure == 0.0
    assert tokenize("Café-au-lait, DON'T! 3.14", use_stemmer=False) == ["caf", "au", "lait", "don", "t", "3", "14"]


def test_unknown_rouge_type_is_a_user_error():
    with pytest.raises(UserError, match="rougeX"):
        rouge("a", "b", rouge_types=("rougeX",))
