"""HELM-style holistic report: every category on a case whose answer is known, then one end-to-end run."""

from __future__ import annotations

import json
import math
import random

import pytest

from peftlab.eval import holistic as H
from peftlab.eval.harness import resolve_tasks, write_results

# ------------------------------------------------------------------------------------- calibration


def test_ece_of_perfectly_calibrated_predictions_is_zero():
    # ten confidence levels k/10, ten items each, k of them correct: every bin's accuracy = confidence
    confidences, correct = [], []
    for k in range(1, 11):
        confidences += [k / 10] * 10
        correct += [1.0] * k + [0.0] * (10 - k)
    assert H.ece_equal_mass(confidences, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_confident_mistakes_is_their_confidence():
    assert H.ece_equal_mass([0.9] * 20, [0.0] * 20) == pytest.approx(0.9)
    assert H.ece_equal_mass([1.0] * 7, [1.0] * 7) == pytest.approx(0.0)


def test_ece_matches_a_numpy_equal_mass_reference():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    conf = [rng.random() for _ in range(103)]
    corr = [float(rng.random() < c) for c in conf]
    order = np.argsort(conf, kind="stable")
    chunks = np.array_split(order, 10)  # equal mass: sizes differ by at most one
    expected = sum(len(c) / 103 * abs(np.mean(np.array(corr)[c]) - np.mean(np.array(conf)[c])) for c in chunks)
    assert H.ece_equal_mass(conf, corr) == pytest.approx(expected)


def test_selective_accuracy_keeps_the_most_confident_tenth():
    conf = [i / 100 for i in range(100)]
    correct = [1.0 if i >= 90 else 0.0 for i in range(100)]  # right exactly on the top 10
    assert H.selective_accuracy(conf, correct, 0.1) == 1.0
    assert H.selective_accuracy(conf, correct, 0.2) == 0.5


# ------------------------------------------------------------------------------------ perturbations


def test_perturbations_do_what_they_say():
    rng = random.Random(0)
    assert H.lowercase("The Cat") == "the cat"
    assert H.contract("We do not know, it is late. Do not go.") == "We don't know, it's late. Don't go."
    spaced = H.extra_spaces("a b  c", random.Random(1))
    assert spaced.split() == ["a", "b", "c"] and all(1 <= len(s) <= 3 for s in spaced.replace("a", "|").replace("b", "|").replace("c", "|").split("|")[1:-1])
    assert H.gender("He gave his book to him. Himself!") == "She gave her book to her. Herself!"
    assert H.dialect("I am going to tell my brother about this") == "I am gonna tell my brotha bout dis"
    text = "because the people believe their friend " * 20
    once, twice = H.misspell(text, random.Random(5)), H.misspell(text, random.Random(5))
    assert once == twice != text  # seeded, and some words changed
    changed = [(a, b) for a, b in zip(text.split(), once.split()) if a != b]
    table = H.lexicon("perturbations")["misspellings"]
    assert changed and all(b in table[a] for a, b in changed)
    assert 0.02 < len(changed) / len(text.split()) < 0.25  # about one word in ten
    mixed = H.mild_mix("Do NOT leave   the Door open", rng)
    assert mixed == mixed.lower() and "don't" in mixed


def test_perturbing_a_document_leaves_target_and_choices_alone(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "He said his Answer", "options": ["He", "She"], "label": "He"}) + "\n")
    (tmp_path / "t.yaml").write_text(f"""
task: t
dataset_path: json
dataset_kwargs: {{data_files: {{test: {path}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: options
doc_to_target: label
""")
    task = resolve_tasks([str(tmp_path / "t.yaml")])[0]
    doc = task.docs[0]
    assert H.document_perturber(task, "gender", 0)(doc, 0) == {"question": "She said her Answer", "options": ["He", "She"], "label": "He"}


# --------------------------------------------------------------------------------------------- bias


GENDER = H.lexicon("bias")["groups"]["gender"]


def test_representation_of_only_male_words_is_half():
    assert H.representation_bias(["He said he would bring his dog.", "Him again."], GENDER) == pytest.approx(0.5)
    assert H.representation_bias(["She and he met her brother."], GENDER) == pytest.approx(0.0)
    assert H.representation_bias(["No people here."], GENDER) is None
    race = H.lexicon("bias")["groups"]["race"]
    assert H.representation_bias(["Maria and Carlos."], race) == pytest.approx(2 / 3)  # one of three groups


def test_stereotypical_association():
    assert H.stereotype_bias(["The nurse said she was tired.", "Her nurse came."], GENDER, ["nurse"]) == pytest.approx(0.5)
    assert H.stereotype_bias(["The nurse told him and her."], GENDER, ["nurse", "pilot"]) == pytest.approx(0.0)
    # two targets, one balanced and one fully skewed: the mean of 0 and 0.5
    texts = ["The doctor and his son.", "The nurse and her friend.", "The nurse met him."]
    assert H.stereotype_bias(texts, GENDER, ["doctor", "nurse"]) == pytest.approx((0.5 + 0.0) / 2)


def test_toxicity_counts_flagged_generations_by_whole_words():
    terms = H.lexicon("toxicity")["terms"]
    texts = ["You are an idiot.", "A classic assessment.", "Shut up, please", "Nice weather."]
    assert H.toxic_fraction(texts, terms) == pytest.approx(0.5)  # 'classic' / 'assessment' are not flagged
    assert H.toxic_fraction([], terms) is None


# ------------------------------------------------------------------------------------- end to end


def test_robustness_and_fairness_are_per_item_worst_cases():
    # right on the original and on one perturbation, wrong on another: that item counts as wrong
    original, lowercase_variant, dialect_variant = [1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0]
    assert H.worst_case(original, lowercase_variant) == [1, 0, 0, 1]
    assert H.worst_case(original, lowercase_variant, dialect_variant) == [1, 0, 0, 0]
    assert H.worst_case(original, original) == original  # a perturbation that changes nothing costs nothing
    assert H.worst_case([1, None], [0, 1]) == [0, None]  # an item without a per-item score stays unscored


def test_efficiency_numbers_by_hand():
    numbers = H.efficiency_numbers(gen_tokens=100, gen_seconds=2.0, mc_items=30, mc_seconds=6.0)
    assert numbers["tokens_per_second"] == 50.0 and numbers["seconds_per_output_token"] == 0.02
    assert numbers["mc_items_per_second"] == 5.0
    nothing = H.efficiency_numbers(0, 0.0, 0, 0.0)
    assert nothing["tokens_per_second"] is None and nothing["seconds_per_output_token"] is None


def test_holistic_report_end_to_end(tiny_llama_dir, shared_data, tmp_path):
    report = H.run_holistic(str(tiny_llama_dir), ["mmlu_anatomy", "bbh_boolean_expressions"], data_root=shared_data,
                            split="val", limit=6, max_gen_toks=4, probe_tokens=6, probes=["The doctor said", "He and his"])
    mmlu, bbh = report.tasks["mmlu_anatomy"], report.tasks["bbh_boolean_expressions"]
    for entry in (mmlu, bbh):  # worst cases can only lose accuracy
        assert entry["robustness"] <= entry["accuracy"] + 1e-12 and entry["fairness"] <= entry["accuracy"] + 1e-12
        assert entry["robustness"] <= entry["accuracy_mild_mix"] + 1e-12
    assert mmlu["perturbed_items"]["mild_mix"] == 6  # every question is lowercased at least
    assert 0 <= mmlu["ece"] <= 1 and "ece" not in bbh
    assert len(report.generations) == 6 + 2 and report.efficiency["tokens_per_second"] > 0
    assert "not HELM's Perspective API" in report.toxicity["lexicon"]
    assert {r["category"] for r in report.rows()} == {"accuracy", "calibration", "robustness", "fairness", "bias",
                                                      "toxicity", "efficiency"}
    saved = json.loads(write_results(report, tmp_path / "holistic.json").read_text())
    assert saved["summary"]["accuracy"] == pytest.approx(report.summary["accuracy"])
    png = H.plot_holistic(saved, tmp_path / "holistic.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(v is None or not (isinstance(v, float) and math.isnan(v)) for v in saved["summary"].values())
