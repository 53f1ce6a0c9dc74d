"""Property-based tests (hypothesis): any record, template or text either works or ends in one clear line.

Data: arbitrary records (missing fields, wrong types, empty and huge strings, any unicode) written
to .jsonl and .csv files, read back by the real loader and sent through the whole pass
(templates -> splits -> examples -> token ids) must give valid examples or a one-line UserError,
never another exception. Metrics: arbitrary prediction/reference strings through ROUGE and BLEU
never raise, stay in [0, 1] and equal rouge-score 0.1.2, sacrebleu and NLTK as tests/test_rouge.py
and tests/test_bleu.py define equality. Every test draws a fixed, bounded number of examples
(``derandomize=True``: the same examples on every run).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import sacrebleu
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu
from rouge_score import rouge_scorer
from tiny import build_tokenizer

from peftlab.data.encode import IGNORE_INDEX, encode_example
from peftlab.data.pipeline import prepare
from peftlab.data.sources import load_records
from peftlab.data.templates import builtin_templates, example_record, load_templates
from peftlab.errors import UserError
from peftlab.eval.bleu import corpus_bleu, sentence_bleu
from peftlab.eval.rouge import ROUGE_TYPES, rouge
from peftlab.eval.score import score


def _settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _assert_one_line(error: UserError) -> None:
    message = str(error)
    assert message.strip() and len(message.splitlines()) == 1, repr(message)


# ------------------------------------------------------------------------------------------ strategies

TOKENIZER = build_tokenizer()
CHAT_TOKENIZER = build_tokenizer()
CHAT_TOKENIZER.chat_template = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


# Any code point but lone surrogates (not text; a JSON "\ud800" escape is tested on its own below).
ANY_CHAR = st.characters(blacklist_categories=("Cs",))
WEIRD = [
    "", " ", "\n", "\r\n", "\r", "\t", "\x00", "a\x00b", "\x1b[31m", "\u202eabc\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd",
    "\U0001f600\U0001f469\u200d\U0001f4bb", "\u2028", "\u2029", "\x85", "\ufeff", "\uffff", "\U0010ffff", "\u0301",
    "{{ x }}", "{% if %}", "}}", '"', "'", ",", "\\", "İ", "ß", "\u212a", "...", "#Person1#: hi",
]
TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=40),
    st.sampled_from(WEIRD),
    st.lists(st.sampled_from(WEIRD), max_size=6).map("".join),
)
# Huge values are built whole, not char by char: just over csv's default limit of 131,072 characters a value.
HUGE = st.builds(
    lambda chunk, n: (chunk * n)[:n], st.sampled_from(["x", "é ", "\U0001f600\n", "ab,\r\n\""]), st.integers(131_073, 140_000)
)
TEXT_OR_HUGE = st.one_of(TEXT, TEXT, TEXT, HUGE)
# Far past any max_length, small enough to tokenise quickly.
TEXT_OR_LONG = st.one_of(TEXT, TEXT, TEXT, st.builds(lambda chunk, n: chunk * n, st.sampled_from(WEIRD[1:]), st.integers(500, 5000)))


def _mostly(usual, rare, one_in: int = 5):
    """``usual``, and ``rare`` about once in ``one_in`` draws (``st.one_of`` would not keep that ratio)."""
    return st.integers(1, one_in).flatmap(lambda k: rare if k == 2 else usual)


BUILTINS = builtin_templates()
BUILTIN_FIELDS = sorted({f for task in BUILTINS.values() for f in task.fields} | {"input", "answer_choices"})
FIELD_NAME = _mostly(st.sampled_from(BUILTIN_FIELDS), TEXT, 2)
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**300), 10**300), st.floats(allow_nan=False), TEXT_OR_HUGE
)
JSON_VALUE = st.recursive(
    SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=4
)
FIELD_VALUE = _mostly(TEXT, JSON_VALUE, 4)  # mostly text, as data sets hold; any JSON value too
VALID_FRACTIONS = st.sampled_from(["1,0,0", "0.8,0.1,0.1", "0.5,0.5,0", "0.34,0.33,0.33", " 1 , 0 , 0 "])
FRACTIONS = _mostly(VALID_FRACTIONS, st.one_of(TEXT, st.just("0,0,1")), 6)


@st.composite
def _records_and_template(draw, fields: list[str] | None = None) -> tuple[list[dict], str | None]:
    """Records shaped for one task (each field present most of the time, any value), some other keys,
    and the --template to use: detected (None), the task's, or another built-in."""
    task = draw(st.sampled_from(sorted(BUILTINS)))
    fields = fields or BUILTINS[task].fields
    records = []
    for _ in range(draw(st.integers(1, 4))):
        record = {field: draw(FIELD_VALUE) for field in fields if draw(st.integers(1, 8)) != 2}
        record.update(draw(st.dictionaries(FIELD_NAME, FIELD_VALUE, max_size=2)))
        records.append(record)
    template = draw(_mostly(st.sampled_from([task, task, None]), st.sampled_from(sorted(BUILTINS)), 6))
    return records, template


def _write_jsonl(path: Path, records: list[dict], ascii_only: bool) -> None:
    lines = [json.dumps(record, ensure_ascii=ascii_only) for record in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="")


def _csv_records(records: list[dict]) -> list[dict]:
    """The records as a CSV file holds them: every value a string, one header for all (missing -> "")."""
    header = list(dict.fromkeys(str(k) for record in records for k in record if not str(k).startswith("\ufeff")))
    as_text = [{str(k): v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in r.items()} for r in records]
    return [{k: row.get(k, "") for k in header} for row in as_text]


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    if rows and rows[0]:
        writer.writerow(list(rows[0]))
        writer.writerows(list(row.values()) for row in rows)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")


# --------------------------------------------------------------------------------------- data pipeline


def _check_prepared(source: str, template: str | None, fractions: str, seed: int, records: list[dict]) -> None:
    """``prepare`` gives valid examples of ``records`` in the source, or one UserError line."""
    try:
        data = prepare(source, template, fractions, seed)
    except UserError as error:
        _assert_one_line(error)
        return
    examples = data.examples("all")
    assert [ex.index for ex in examples] == list(range(len(records)))
    for ex in examples:
        assert isinstance(ex.prompt, str) and isinstance(ex.completion, str)
        assert {k: v for k, v in ex.record.items() if k != "_index"} == {
            k: v for k, v in records[ex.index].items() if k != "_index"
        }
        if data.task.task == "prompt_completion" and isinstance(records[ex.index].get("prompt"), str):
            assert ex.prompt == records[ex.index]["prompt"]  # verbatim: nothing escaped, stripped or cut
        if data.task.task == "prompt_completion" and isinstance(records[ex.index].get("completion"), str):
            assert ex.completion == records[ex.index]["completion"]
        encoded = encode_example(TOKENIZER, ex.prompt, ex.completion, is_seq2seq=False, chat=False, max_length=64, max_target_length=16)
        assert 0 < len(encoded.input_ids) <= 64 and all(0 <= i < len(TOKENIZER) for i in encoded.input_ids)


@_settings(200)
@given(data=_records_and_template(), fractions=FRACTIONS, seed=st.integers(0, 2**32), ascii_only=st.booleans())
def test_any_records_in_a_jsonl_file(data, fractions, seed, ascii_only):
    records, template = data
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        _write_jsonl(path, records, ascii_only)
        assert load_records(str(path)) == records  # the loader reads back exactly what was written
        _check_prepared(str(path), template, fractions, seed, records)


@_settings(120)
@given(data=_records_and_template(), fractions=FRACTIONS, seed=st.integers(0, 2**32))
def test_any_records_in_a_csv_file(data, fractions, seed):
    records, template = data
    rows = _csv_records(records)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.csv"
        _write_csv(path, rows)
        try:
            loaded = load_records(str(path))
        except UserError as error:  # records without fields: an empty file
            _assert_one_line(error)
            return
        assert loaded == rows  # every value a string, exactly as written (quoted newlines, \r and commas kept)
        _check_prepared(str(path), template, fractions, seed, loaded)


# Generated task files: random field names and text around Jinja pieces, some of which fail on some values.
IDENTIFIER = _mostly(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True),
    st.sampled_from(["in", "not", "if", "true", "None", "loop", "range", "self", "answer_choices", "_index"]),
)
PLAIN = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}%#"), max_size=20)


@st.composite
def _jinja(draw, fields: list[str]) -> str:
    """Plain text around pieces that work on any value (mostly), or fail on some (a number, a list ...)."""
    field = st.sampled_from(fields)

    def forms(*sources: str):  # each source with FIELD replaced by one of the fields
        return st.one_of(*(field.map(lambda name, source=source: source.replace("FIELD", name)) for source in sources))

    works = st.one_of(
        forms("{{ FIELD }}", "{{ FIELD | upper }}", "{% if FIELD is defined and FIELD %}yes{% else %}no{% endif %}"),
        st.tuples(field, field).map(lambda pair: "{{ " + pair[0] + " ~ ' ' ~ " + pair[1] + " }}"),
    )
    may_fail = st.one_of(
        forms("{{ FIELD | join(', ') }}", "{{ FIELD | length }}", "{{ FIELD + 1 }}", "{{ FIELD * 2 }}", "{{ FIELD[0] }}",
              "{{ FIELD.name }}", "{{ 10 / (FIELD | int) }}", "{% for x in FIELD %}{{ x }},{% endfor %}"),
        st.sampled_from(["{{ range(10**9) | list }}", "{{ ''.__class__.__mro__ }}", "{{ answer_choices | join('|') }}"]),
        TEXT,  # may hold "{{", "{%" or "}}": a syntax error
    )
    return "".join(draw(st.lists(_mostly(st.one_of(PLAIN, works), may_fail, 6), min_size=1, max_size=4)))


@st.composite
def _task_file(draw) -> tuple[str, list[str]]:
    """(YAML text, the template's field names): mostly a well-formed task, sometimes a broken one."""
    fields = draw(st.lists(IDENTIFIER, min_size=1, max_size=4, unique=True))
    templates = [
        {"name": draw(_mostly(st.just(f"phrasing{i}"), TEXT, 8)), "input": draw(_jinja(fields)),
         "target": draw(_jinja(fields))}
        for i in range(draw(st.integers(1, 3)))
    ]
    doc: dict = {"task": draw(_mostly(IDENTIFIER, TEXT, 8)), "templates": templates}
    doc["fields"] = draw(st.lists(st.sampled_from(fields), unique=True))
    if draw(st.integers(1, 4)) == 2:
        doc["answer_choices"] = draw(st.one_of(st.lists(TEXT, max_size=3), JSON_VALUE))
    if draw(st.integers(1, 10)) == 2:
        doc[draw(TEXT)] = draw(JSON_VALUE)  # an unknown key
    if draw(st.integers(1, 10)) == 3:
        return draw(st.one_of(TEXT, st.just("templates: ["), st.just("- task"))), fields  # not a task at all
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans())), fields


@_settings(200)
@given(task=_task_file(), data=st.data(), fractions=FRACTIONS, seed=st.integers(0, 2**32))
def test_generated_template_files_on_any_records(task, data, fractions, seed):
    yaml_text, fields = task
    records, _ = data.draw(_records_and_template(fields))
    with tempfile.TemporaryDirectory() as folder:
        template_path, data_path = Path(folder) / "task.yaml", Path(folder) / "data.jsonl"
        template_path.write_text(yaml_text, encoding="utf-8")
        _write_jsonl(data_path, records, ascii_only=False)
        try:
            load_templates(template_path)
        except UserError as error:
            _assert_one_line(error)
        _check_prepared(str(data_path), str(template_path), fractions, seed, records)


def test_line_breaks_inside_values_are_kept(tmp_path):
    """What hypothesis found first: a raw U+2028 or U+0085 inside a JSON string is not a line end of a
    .jsonl file, and a CSV value keeps its "\r" and "\r\n" and may be longer than 128 KiB."""
    records = [{"prompt": "a\u2028b\x85c\u2029", "completion": "d"}]
    _write_jsonl(tmp_path / "data.jsonl", records, ascii_only=False)
    assert load_records(str(tmp_path / "data.jsonl")) == records
    rows = [{"prompt": "a\rb", "completion": "c\r\nd"}, {"prompt": "x" * 200_000, "completion": "y"}]
    _write_csv(tmp_path / "data.csv", rows)
    assert load_records(str(tmp_path / "data.csv")) == rows


@pytest.mark.parametrize(
    "content",
    [
        '{"prompt": "a", "completion": ' + "9" * 5000 + "}\n",  # past Python's 4300-digit int limit
        '{"prompt": "a", "completion": ' + "[" * 100_000 + "]" * 100_000 + "}\n",  # nested past the recursion limit
        '{"prompt": "a\\ud800", "completion": "b"}\n',  # half of a surrogate pair: not text
        '{"prompt": "a", "completion": "\\udc00"}\n',
    ],
    ids=["huge-number", "deep-nesting", "lone-high-surrogate", "lone-low-surrogate"],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_that_python_cannot_hold_is_one_line(tmp_path, content, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(content if suffix == ".jsonl" else f"[{content.strip()}]", encoding="utf-8")
    with pytest.raises(UserError) as error:
        prepare(str(path), None, "1,0,0", 0)
    _assert_one_line(error.value)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("record", ['{"text": ' + "9" * 5000 + "}", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_a_record_python_cannot_hold_is_one_line(record):
    """``peftlab templates render --record JSON``: the same limits, the same kind of answer."""
    with pytest.raises(UserError) as error:
        example_record(record)
    _assert_one_line(error.value)


def test_surrogate_pairs_in_json_are_text(tmp_path):
    """A JSON escape pair is one code point (an emoji): valid, unlike half of a pair."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "\\ud83d\\ude00", "completion": "\\u00e9"}\n', encoding="utf-8")
    assert prepare(str(path), None, "1,0,0", 0).splits["train"][0].prompt == "\U0001f600"


@pytest.mark.parametrize(
    "template",
    [
        "{{ " + "9" * 5000 + " }}",  # a number past Python's int limit
        "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",  # nested past the recursion limit
    ],
    ids=["huge-number", "deep-nesting"],
)
def test_templates_python_cannot_compile_are_one_line(tmp_path, template):
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({"task": "t", "templates": [{"name": "n", "input": template, "target": "x"}]}))
    with pytest.raises(UserError) as error:
        load_templates(path)
    _assert_one_line(error.value)


@pytest.mark.parametrize("content", [b"[" * 100_000, b"task: \xff\xfe not utf-8\n"], ids=["deep-nesting", "latin-1"])
def test_template_files_python_cannot_read_are_one_line(tmp_path, content):
    path = tmp_path / "task.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        load_templates(path)
    _assert_one_line(error.value)


# ------------------------------------------------------------------------------------------- encoding

@_settings(200)
@given(
    prompt=TEXT_OR_LONG,
    completion=TEXT_OR_LONG,
    max_length=st.integers(2, 96),
    data=st.data(),
    is_seq2seq=st.booleans(),
    chat=st.booleans(),
)
def test_encode_any_text(prompt, completion, max_length, data, is_seq2seq, chat):
    """Ids in the vocabulary, within the lengths, the completion (cut from the right) as labels, closed by EOS."""
    max_target_length = data.draw(st.integers(1, max_length - 1))  # TrainConfig: smaller than max_length
    tokenizer = CHAT_TOKENIZER if chat else TOKENIZER
    encoded = encode_example(
        tokenizer, prompt, completion, is_seq2seq=is_seq2seq, chat=chat,
        max_length=max_length, max_target_length=max_target_length,
    )  # fmt: skip
    vocab = len(tokenizer)
    assert all(0 <= i < vocab for i in encoded.input_ids)
    target = tokenizer(completion, add_special_tokens=False)["input_ids"][: max_target_length - 1]
    eos = tokenizer.eos_token_id
    assert len(encoded.input_ids) <= max_length
    if is_seq2seq:
        assert encoded.labels == target + [eos]
        assert encoded.input_ids == tokenizer(prompt)["input_ids"][-max_length:]  # the end kept, with any closing EOS
    else:
        prompt_len = len(encoded.input_ids) - len(target) - 1
        assert prompt_len >= 1 and len(encoded.labels) == len(encoded.input_ids)
        assert encoded.labels == [IGNORE_INDEX] * prompt_len + target + [eos]
        assert encoded.input_ids[prompt_len:] == target + [eos]
    if len(target) < max_target_length - 1:  # not cut: the labels decode back to the completion
        assert tokenizer.decode(target) == completion


# ------------------------------------------------------------------------------------------- metrics

WORDS = (
    "the cat cats running run ran happily happiness generalization connected connection agreed feed fed "
    "skies sky is are was has ha being tea cup warm cold outside summary summaries I'm don't 3 42 3.14 1,000 "
    "café naïve Zürich 東京 наука İstanbul ÉCOLE state-of-the-art U.S.A. e-mail"
).split()
SEPARATORS = [" ", " ", " ", "  ", "\n", "\n\n", "\t", ". ", ", ", " - ", "\r\n", "\u2028", "!?", "\x00"]
WORDY = st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=30).map(
    lambda pairs: "".join(w + s for w, s in pairs)
)
SCORED_TEXT = st.one_of(
    WORDY,
    WORDY,
    st.text(ANY_CHAR, max_size=60),
    st.sampled_from(["", " ", "\n\n\n", "   \t ", "...", "!?!?", "--- ,,, ;;;", "\u200b", "\U0001f600 \U0001f600"]),
    st.builds(lambda text, n: text * n, WORDY, st.integers(2, 12)),  # long, many lines, many repeats
)


@st.composite
def _pair(draw) -> tuple[str, str]:
    """(prediction, reference); mostly one is an edited copy of the other (lines reordered, words dropped
    and added), so scores land inside (0, 1) and ROUGE-Lsum parts from ROUGE-L."""
    reference = draw(SCORED_TEXT)
    if draw(st.integers(1, 4)) == 2:
        return draw(SCORED_TEXT), reference
    edited = []
    for line in draw(st.permutations(reference.split("\n"))):
        words = [word for word in line.split(" ") if draw(st.integers(1, 5)) != 2]
        edited.append(" ".join(words + draw(st.lists(st.sampled_from(WORDS), max_size=2))))
    prediction = "\n".join(edited)
    return (prediction, reference) if draw(st.booleans()) else (reference, prediction)


SCORERS = {stem: rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem) for stem in (False, True)}


def _assert_rouge_equal(prediction: str, reference: str, use_stemmer: bool) -> None:
    ours = rouge(prediction, reference, use_stemmer=use_stemmer)
    theirs = SCORERS[use_stemmer].score(reference, prediction)  # rouge-score takes (target, prediction)
    assert list(ours) == list(theirs)
    for rouge_type, expected in theirs.items():
        for measure in ("precision", "recall", "fmeasure"):
            value = getattr(ours[rouge_type], measure)
            assert 0.0 <= value <= 1.0, (rouge_type, measure, value)
            assert value == pytest.approx(getattr(expected, measure), abs=1e-9, rel=0), (rouge_type, measure)


@_settings(400)
@given(pair=_pair(), use_stemmer=st.booleans())
def test_rouge_equals_rouge_score_on_any_text(pair, use_stemmer):
    _assert_rouge_equal(*pair, use_stemmer)


def _nltk_bleu(prediction: str, reference: str, max_order: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns about zero counts, then returns ~0
        return nltk_sentence_bleu([reference.split()], prediction.split(), weights=(1 / max_order,) * max_order)


@_settings(250)
@given(pair=_pair(), max_order=st.integers(1, 4))
def test_sentence_bleu_equals_nltk_on_any_text(pair, max_order):
    ours = sentence_bleu(*pair, max_order=max_order)
    assert 0.0 <= ours <= 1.0
    assert ours == pytest.approx(_nltk_bleu(*pair, max_order), abs=1e-12, rel=1e-12)


@_settings(120)
@given(pairs=st.lists(_pair(), min_size=1, max_size=6))
def test_corpus_bleu_equals_sacrebleu_on_any_text(pairs):
    predictions, references = map(list, zip(*pairs))
    ours, signature = corpus_bleu(predictions, references)
    assert 0.0 <= ours <= 1.0
    assert ours == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score / 100, abs=1e-12)
    assert "nrefs:1" in signature


@_settings(40)
@given(pairs=st.lists(_pair(), min_size=1, max_size=5), use_stemmer=st.booleans(), bootstrap=st.sampled_from([0, 7]))
def test_score_on_any_text(pairs, use_stemmer, bootstrap):
    predictions, references = map(list, zip(*pairs))
    report = score(predictions, references, use_stemmer=use_stemmer, bootstrap=bootstrap)
    assert all(0.0 <= value <= 1.0 for value in report.aggregate.values()), report.aggregate
    for low, high in report.intervals.values():
        assert 0.0 <= low <= high <= 1.0
    for row, (prediction, reference) in zip(report.per_example, pairs):
        theirs = SCORERS[use_stemmer].score(reference, prediction)
        for rouge_type in ROUGE_TYPES:
            assert row[rouge_type]["fmeasure"] == pytest.approx(theirs[rouge_type].fmeasure, abs=1e-9, rel=0)
        assert row["bleu"] == pytest.approx(_nltk_bleu(prediction, reference, 4), abs=1e-12, rel=1e-12)
    assert report.aggregate["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score / 100, abs=1e-12)


def test_long_texts_equal_the_reference_libraries():
    """Hundreds of tokens on many lines: the bit-parallel LCS against rouge-score's table."""
    words = [WORDS[(i * 7 + i // 5) % len(WORDS)] for i in range(800)]
    reference = "\n".join(" ".join(words[i : i + 25]) for i in range(0, 800, 25))
    prediction = "\n".join(" ".join(words[i : i + 30][::-1] if i % 60 == 0 else words[i : i + 30]) for i in range(0, 800, 30))
    for use_stemmer in (False, True):
        _assert_rouge_equal(prediction, reference, use_stemmer)
    assert sentence_bleu(prediction, reference) == pytest.approx(_nltk_bleu(prediction, reference, 4), abs=1e-12)
