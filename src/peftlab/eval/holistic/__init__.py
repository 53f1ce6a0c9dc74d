"""``peftlab holistic``: a HELM-style report (Liang et al. 2022) for a model on a set of tasks.

    >>> from peftlab.eval.harness import write_results
    >>> from peftlab.eval.holistic import run_holistic, plot_holistic
    >>> report = run_holistic("smollm2-135m-instruct", ["mmlu_anatomy", "bbh_boolean_expressions"],
    ...                       data_root="../shared/data", split="val", limit=20)
    >>> report.summary["robustness"], report.rows()
    >>> write_results(report, "holistic.json"); plot_holistic(report, "holistic.png")

``run_holistic_config(HolisticConfig(...))`` is the same run from the typed config (``peftlab holistic``).

What each category measures (HELM's definitions, measured here by peftlab):

- **accuracy**: each task's main metric (``acc`` for multiple choice, else its first metric).
- **calibration** (multiple-choice tasks): confidence = the largest softmax probability over the
  choices' loglikelihoods. ``ece`` is the 10-bin *equal-mass* expected calibration error
  ``Σ_b |B_b|/N · |acc(B_b) - conf(B_b)|`` (items sorted by confidence, cut into 10 groups of
  equal size); ``selective_acc@10`` the accuracy on the 10% most confident items.
- **robustness**: per item, the worst score over the original question and its *mild mix*
  perturbation (lowercase, then contractions, then misspellings with probability 0.1, then each
  run of spaces replaced by 1-3 spaces; HELM's ``MildMixPerturbation``); averaged.
- **fairness**: per item, the worst over the original, an African American English dialect
  rewrite and male -> female pronouns; averaged.
- **bias** (on generations: the generation tasks' outputs and built-in probe prompts):
  *demographic representation*, the total-variation distance ``½ Σ_g |p_g - 1/G|`` between the
  distribution of group-word mentions (e.g. female vs male words) and uniform (0 = balanced,
  0.5 = only one of two groups); *stereotypical association*, the same distance for the groups
  co-occurring with each target word (adjectives, professions), averaged over target words.
- **toxicity**: the fraction of generations containing a term of a local lexicon. HELM uses the
  Perspective API, which is not reachable here; the lexicon used is named in the output.
- **efficiency**: measured generation throughput (tokens/s), seconds per output token, and
  multiple-choice items scored per second, on this machine.

Perturbations change the evaluated document's text fields (not the few-shot examples, the choices
or the target: HELM does not perturb references) and are seeded per item. Word lists live in
``peftlab/eval/lexicons/*.yaml``.

Modules: :mod:`.perturbations` (the text rewrites), :mod:`.measures` (the categories' numbers, pure
functions), :mod:`.words` (word lists and matching), :mod:`.runner` (the run and its plot).
"""

from peftlab.eval.holistic.measures import (
    ece_equal_mass,
    efficiency_numbers,
    representation_bias,
    selective_accuracy,
    stereotype_bias,
    total_variation_from_uniform,
    toxic_fraction,
    worst_case,
)
from peftlab.eval.holistic.perturbations import (
    FAIRNESS,
    PERTURBATIONS,
    ROBUSTNESS,
    contract,
    dialect,
    document_perturber,
    extra_spaces,
    gender,
    lowercase,
    mild_mix,
    misspell,
)
from peftlab.eval.holistic.runner import HolisticResult, plot_holistic, run_holistic, run_holistic_config
from peftlab.eval.holistic.words import lexicon

__all__ = [
    "FAIRNESS",
    "PERTURBATIONS",
    "ROBUSTNESS",
    "HolisticResult",
    "contract",
    "dialect",
    "document_perturber",
    "ece_equal_mass",
    "efficiency_numbers",
    "extra_spaces",
    "gender",
    "lexicon",
    "lowercase",
    "mild_mix",
    "misspell",
    "plot_holistic",
    "representation_bias",
    "run_holistic",
    "run_holistic_config",
    "selective_accuracy",
    "stereotype_bias",
    "total_variation_from_uniform",
    "toxic_fraction",
    "worst_case",
]
