"""Helpers shared by test modules: a tiny dialogue data file, a run's losses, and a command that must fail."""

from __future__ import annotations

import json

from peftlab.cli import main


def write_dialogues(path, n=48):
    names, days, places = ["Tom", "Anna", "Ben", "Lisa"], ["Monday", "Friday", "Sunday"], ["cafe", "park", "office"]
    with open(path, "w") as f:
        for i in range(n):
            a, d, p = names[i % 4], days[i % 3], places[(i // 3) % 3]
            f.write(json.dumps({
                "dialogue": f"#Person1#: Hi {a}, shall we meet at the {p} on {d}?\n#Person2#: Yes, the {p} on {d} is fine.",
                "summary": f"{a} will meet #Person1# at the {p} on {d}.",
            }) + "\n")
    return path


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def expect_error(args, capsys) -> str:
    """Run a command that must fail: exit 2, no traceback, and the message is its one last line.

    (Progress bars of work done before the mistake showed up may stand above it on stderr.)
    """
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    message = err.replace("\r", "\n").splitlines()[-1]
    assert message.startswith("peftlab") and "error:" in message and "Traceback" not in err, err
    assert err.count("error:") == 1, err
    return message
