"""Data: load records from any source, render them with prompt templates, split them.

    records = load_records("demo:dialogsum")              # or a .jsonl/.json/.csv/.parquet file, hf:NAME ...
    task = resolve_templates(None, records)               # auto-detected from the record fields
    splits = split_records(records, (0.8, 0.1, 0.1), seed=0)
    prompt, target = render(task, splits["train"][0], splits["train"][0]["_index"], seed=0)
"""

from peftlab.data.demo import dialogsum_demo
from peftlab.data.sources import DEMO_SOURCES, load_records
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
