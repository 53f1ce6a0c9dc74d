"""What each fine-tuning method is, in one table: its family, default learning rate, what it saves.

The configs (``--method`` choices, the default ``--lr``, which methods take ``--quantize nf4``),
the training methods (``peftlab.training.methods``, one builder per entry here), ``compare``
(what merges, what runs on a 4-bit base) and the README's methods table all read these facts;
tests/test_method_table.py checks that they agree. Adding a method is one entry here and one
builder in ``peftlab.training.methods``. This module imports nothing heavy (no torch), so the
configs can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from peftlab.errors import UserError

Family = Literal["full", "reparameterisation", "additive", "selective"]
QuantisedBase = Literal["always", "optional", "never"]


@dataclass(frozen=True)
class MethodFacts:
    name: str
    """The ``--method`` value."""
    family: Family
    trains: str
    """What trains, in a few words (the README's "what trains")."""
    default_lr: float
    """Peak learning rate when ``--lr`` is not given (few parameters, or soft prompts, want larger steps)."""
    saved_as: str
    """What ``final/`` holds: an HF model folder, or an adapter folder of this peft_type (ours when peft has none)."""
    mergeable: bool = False
    """``peftlab merge`` folds the adapter into the base weights (the LoRA family)."""
    quantised_base: QuantisedBase = "never"
    """A 4-bit NF4 base: always (qlora), optional (``--quantize nf4``), never."""
    default_targets: str | None = None
    """``--targets`` when not given (None: the method's per-architecture default). The LoRA family adapts every
    linear layer but the output head: on DialogSum (embedded model, 50 steps of 8) q,v alone reached 89% of full
    fine-tuning's ROUGE-1 and all-linear 96-97% (README, "LoRA: defaults, PiSSA / OLoRA, LoRA+")."""


TABLE: tuple[MethodFacts, ...] = (
    MethodFacts("full", "full", "every weight", 5e-5, "HF model folder"),
    MethodFacts("lora", "reparameterisation", "low-rank update B A of each targeted weight", 1e-3, "peft LORA",
                mergeable=True, quantised_base="optional", default_targets="all-linear"),
    MethodFacts("dora", "reparameterisation", "B A and a magnitude per output feature", 1e-3, "peft LORA",
                mergeable=True, quantised_base="optional", default_targets="all-linear"),
    MethodFacts("qlora", "reparameterisation", "LoRA on a frozen 4-bit NF4 base", 1e-3, "peft LORA",
                mergeable=True, quantised_base="always", default_targets="all-linear"),
    MethodFacts("adapter", "additive", "bottleneck layers", 1e-3, "BOTTLENECK (ours)"),
    MethodFacts("prompt", "additive", "soft prompt", 3e-2, "peft PROMPT_TUNING"),
    MethodFacts("prefix", "additive", "key/value prefixes (MLP folded at save)", 1e-3, "peft PREFIX_TUNING"),
    MethodFacts("ia3", "additive", "scaling vectors on k, v, feed-forward input", 1e-3, "peft IA3"),
    MethodFacts("bitfit", "selective", "the biases", 1e-3, "SELECTIVE (ours)"),
    MethodFacts("layernorm", "selective", "the normalisation weights", 1e-3, "SELECTIVE (ours)"),
    MethodFacts("selective", "selective", "the chosen modules' parameters", 1e-3, "SELECTIVE (ours)"),
)
METHODS: dict[str, MethodFacts] = {facts.name: facts for facts in TABLE}
NAMES: tuple[str, ...] = tuple(METHODS)


LORA_PLAIN_INITS = ("kaiming", "gaussian")
"""LoRA inits that leave the base weights alone (B = 0); the others (pissa, olora) start from W and keep the residual."""


def get(name: str) -> MethodFacts:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(NAMES)}")
    return METHODS[name]
