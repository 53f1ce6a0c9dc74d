"""Data, in one pass: source -> records -> templates -> splits -> examples.

    pipeline.prepare(source, template, fractions, seed)  one task: its examples of each split
    pipeline.prepare_mixture(["NAME=SOURCE", ...], ...)   that pass for each task, then the training
                                                         splits mixed (mixtures.py)

Each step lives in its own module, for code that needs one on its own::

    records = load_records("demo:dialogsum")                  # sources.py (demo/ generates demo:NAME)
    task = resolve_templates(None, records)                   # templates.py: detected from the fields
    splits = split_records(records, (0.8, 0.1, 0.1), seed=0)  # splits.py
    prompt, target = render(task, splits["train"][0], splits["train"][0]["_index"], seed=0)  # templates.py

``encode.py`` then turns examples into token ids and batches, for training and generation.
"""

from peftlab.data.demo import DEMO_SOURCES, dialogsum_demo
from peftlab.data.sources import load_records
from peftlab.data.splits import parse_fractions, split_records
from peftlab.data.templates import (
    TaskTemplates,
    Template,
    builtin_templates,
    load_templates,
    render,
    render_with,
    resolve_templates,
)

__all__ = [
    "DEMO_SOURCES",
    "TaskTemplates",
    "Template",
    "builtin_templates",
    "dialogsum_demo",
    "load_records",
    "load_templates",
    "parse_fractions",
    "render",
    "render_with",
    "resolve_templates",
    "split_records",
]
