"""Every recipe under recipes/ (sub-folders too) is a valid config of the command it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.cli import COMMANDS
from peftlab.config import build, read_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path):
    values = read_recipe(path)
    command = values.pop("command", None)
    assert command in COMMANDS, f"{path.name}: 'command:' must name one of {sorted(COMMANDS)}"
    cls = COMMANDS[command][0]
    values.setdefault("out", "runs/x")
    build(cls, (path.name, values))  # unknown keys, bad types and contradictions raise
