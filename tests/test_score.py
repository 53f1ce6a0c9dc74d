"""score(): per-example ROUGE/BLEU, aggregates, bootstrap intervals; read_texts() and its errors."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from peftlab.errors import UserError
from peftlab.eval.bleu import sentence_bleu
from peftlab.eval.rouge import ROUGE_TYPES
from peftlab.eval.score import ScoreReport, read_texts, score

MEASURES = ("precision", "recall", "fmeasure")


def _data(count: int = 80, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    vocab = "The patient has trouble breathing . doctor asks about allergies and will send #Person2# to".split()
    predictions, references = [], []
    for _ in range(count):
        reference = [rng.choice(vocab) for _ in range(rng.randint(3, 30))]
        kept = [w for w in reference if rng.random() > 0.3] + [rng.choice(vocab) for _ in range(rng.randint(0, 5))]
        half = len(reference) // 2
        references.append(" ".join(reference[:half]) + "\n" + " ".join(reference[half:]))  # two sentences
        predictions.append(" ".join(kept))
    return predictions, references


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_per_example_and_aggregates_match_references(use_stemmer):
    predictions, references = _data()
    report = score(predictions, references, use_stemmer=use_stemmer)
    assert isinstance(report, ScoreReport)
    assert report.num_examples == len(predictions) and report.use_stemmer is use_stemmer
    assert report.intervals == {}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    for row, prediction, reference in zip(report.per_example, predictions, references):
        assert set(row) == {*ROUGE_TYPES, "bleu"}
        expected = scorer.score(reference, prediction)
        for rouge_type in ROUGE_TYPES:
            for measure in MEASURES:
                assert row[rouge_type][measure] == pytest.approx(getattr(expected[rouge_type], measure), abs=1e-9)
        assert row["bleu"] == sentence_bleu(prediction, reference)
    for rouge_type in ROUGE_TYPES:
        mean = statistics.fmean(scorer.score(r, p)[rouge_type].fmeasure for p, r in zip(predictions, references))
        assert report.aggregate[rouge_type] == pytest.approx(mean, abs=1e-12)
        assert report.aggregate[rouge_type] == pytest.approx(
            statistics.fmean(row[rouge_type]["fmeasure"] for row in report.per_example), abs=1e-12
        )
    bleu = sacrebleu.metrics.BLEU()
    expected_bleu = bleu.corpus_score(predictions, [references]).score / 100
    assert report.aggregate["bleu"] == pytest.approx(expected_bleu, abs=1e-12)
    assert report.bleu_signature == str(bleu.get_signature())
    assert report.aggregate["sentence_bleu"] == pytest.approx(
        statistics.fmean(sentence_bleu(p, r) for p, r in zip(predictions, references)), abs=1e-12
    )
    assert 0 < report.aggregate["sentence_bleu"] < 1  # the data must not make the check trivial


def test_bootstrap_interval_contains_mean_and_is_reproducible():
    predictions, references = _data(200)
    report = score(predictions, references, bootstrap=2000, seed=3)
    assert set(report.intervals) == set(ROUGE_TYPES)
    for rouge_type in ROUGE_TYPES:
        low, high = report.intervals[rouge_type]
        mean = report.aggregate[rouge_type]
        assert low < mean < high
        # The percentile interval of a mean is close to the normal one: mean +- 1.96 * sd / sqrt(n).
        values = [row[rouge_type]["fmeasure"] for row in report.per_example]
        normal_half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
        assert 0.85 < (high - low) / (2 * normal_half) < 1.15
        assert abs((low + high) / 2 - mean) < 0.25 * normal_half
    assert score(predictions, references, bootstrap=2000, seed=3).intervals == report.intervals
    assert score(predictions, references, bootstrap=2000, seed=4).intervals != report.intervals
    narrow = score(predictions, references, bootstrap=2000, confidence=0.5, seed=3).intervals
    for rouge_type in ROUGE_TYPES:
        (low, high), (narrow_low, narrow_high) = report.intervals[rouge_type], narrow[rouge_type]
        assert low < narrow_low < narrow_high < high


def test_progress_reports_every_example():
    events = []

    class Bar:
        def update(self, n=1, **stats):
            events.append(n)

        def close(self):
            events.append("closed")

    def progress(description, total, unit="it"):
        events.append(total)
        return Bar()

    score(["a b", "c d", "e"], ["a b", "c", "e f"], progress=progress)
    assert events == [3, 1, 1, 1, "closed"]


def test_score_errors():
    with pytest.raises(UserError, match="3 predictions but 2 references"):
        score(["a", "b", "c"], ["a", "b"])
    with pytest.raises(UserError, match="no examples"):
        score([], [])
    with pytest.raises(UserError, match="bootstrap"):
        score(["a"], ["a"], bootstrap=-1)
    with pytest.raises(UserError, match="confidence"):
        score(["a"], ["a"], bootstrap=10, confidence=95)


def test_read_texts_plain_text(tmp_path):
    path = tmp_path / "predictions.txt"
    path.write_text("first line \n\nthird, with a tab\t\n  last", encoding="utf-8")
    assert read_texts(path) == ["first line ", "", "third, with a tab\t", "  last"]
    path.write_text("one\ntwo\n", encoding="utf-8")
    assert read_texts(str(path)) == ["one", "two"]
    path.write_bytes(b"windows\r\nlines\r\n")
    assert read_texts(path) == ["windows", "lines"]
    path.write_text("", encoding="utf-8")
    assert read_texts(path) == []


def test_read_texts_jsonl(tmp_path):
    path = tmp_path / "references.jsonl"
    lines = [
        json.dumps("a plain string"),
        json.dumps({"text": "Sentence one.\nSentence two.", "id": 7}),
        "",
        json.dumps({"text": "café ünïcode"}, ensure_ascii=False),
        json.dumps(""),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_texts(path) == ["a plain string", "Sentence one.\nSentence two.", "café ünïcode", ""]


@pytest.mark.parametrize(
    "content, message",
    [
        ('"ok"\n{"text": "fine"}\n{"text": broken\n', "line 3 is not valid JSON"),
        ('"ok"\n{"summary": "no text field"}\n', 'line 2 is an object without a "text" field'),
        ('{"text": 3}\n', "line 1 holds int"),
        ("[1, 2]\n", "line 1 holds list"),
    ],
)
def test_read_texts_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as error:
        read_texts(path)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_read_texts_missing_and_undecodable(tmp_path):
    with pytest.raises(UserError) as error:
        read_texts(tmp_path / "nowhere.txt")
    assert "not found" in str(error.value) and "nowhere.txt" in str(error.value) and "\n" not in str(error.value)
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8") as error:
        read_texts(path)
    assert "\n" not in str(error.value)


def test_read_texts_feeds_score(tmp_path):
    (tmp_path / "p.txt").write_text("It is very cold outside\n", encoding="utf-8")
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "It is cold outside."}) + "\n", encoding="utf-8")
    report = score(read_texts(tmp_path / "p.txt"), read_texts(tmp_path / "r.jsonl"))
    assert round(report.aggregate["rouge1"], 3) == 0.889 and round(report.aggregate["rouge2"], 3) == 0.571
