"""The method table agrees with what reads it: training methods, configs, saved formats, merge, README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peftlab import method_table, peft
from peftlab.config import SweepConfig, TrainConfig
from peftlab.errors import UserError
from peftlab.training import methods

README = Path(__file__).parents[1] / "README.md"


def _config(name: str, **options) -> TrainConfig:
    return TrainConfig(model="m", data="d.jsonl", out="o", method=name, train_modules="o_proj" if name == "selective" else None,
                       **options)


def test_every_method_has_a_builder_and_is_a_config_choice():
    assert tuple(methods.METHODS) == method_table.NAMES
    assert all(methods.get(name).name == name for name in method_table.NAMES)
    for cls in (TrainConfig, SweepConfig):
        assert cls.__dataclass_fields__["method"].metadata["choices"] == method_table.NAMES
    with pytest.raises(UserError, match="choose one of: full, lora"):
        methods.get("lorra")


@pytest.mark.parametrize("name", method_table.NAMES)
def test_facts_are_what_the_method_does(name):
    facts = method_table.get(name)
    config = _config(name)
    assert config.learning_rate == facts.default_lr
    assert _config(name, lr=0.5).learning_rate == 0.5
    own = methods.get(name).config
    if facts.family == "full":
        assert own is None and facts.saved_as == "HF model folder"
    else:  # the adapter is saved under the peft_type the table names
        peft_type = next(t for t, fmt in peft.FORMATS.items() if isinstance(own(config), fmt.config_type))
        assert peft_type in facts.saved_as.split()
        assert facts.mergeable == isinstance(own(config), peft.LoraConfig)  # merge_and_unload merges LoRA layers
    if facts.quantised_base == "never":
        with pytest.raises(UserError, match="--quantize nf4"):
            _config(name, quantize="nf4")
    else:
        assert _config(name, quantize="nf4").quantize == "nf4"


def _readme_rows() -> dict[str, list[str]]:
    """method name -> [family, method cell, what trains, final/, default lr] of README's methods table."""
    text = README.read_text()
    lines = text[text.index("| family | method |"):].splitlines()
    rows, family = {}, ""
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        family = cells[0] or family
        name = re.match(r"`(\w+)`", cells[1]).group(1)
        assert name not in rows, f"README lists {name} twice"
        rows[name] = [family, *cells[1:]]
    return rows


def test_readme_methods_table_is_the_table():
    rows = _readme_rows()
    assert list(rows) == list(method_table.NAMES)
    for facts in method_table.TABLE:
        family, _, trains, saved_as, lr = rows[facts.name]
        assert (family, trains, saved_as, float(lr)) == (facts.family, facts.trains, facts.saved_as, facts.default_lr), facts.name
    merged = re.search(r"`peftlab merge`\s+folds the LoRA family \(([^)]*)\)", README.read_text()).group(1)
    assert merged.split(", ") == [f.name for f in method_table.TABLE if f.mergeable]
