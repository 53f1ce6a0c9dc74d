"""The ``peftlab`` command line: the only module that prints.

    peftlab demo
    peftlab train --model smollm2-135m-instruct --data demo:dialogsum --out runs/sum --max-steps 30
    peftlab eval --model runs/sum/final --data demo:dialogsum --out runs/sum/eval
    peftlab generate --model runs/sum/final --prompt "Summarize the following conversation. ..."
    peftlab score --predictions preds.txt --references refs.txt

Every command's flags come from its typed config (``peftlab.config``): ``--help`` lists them all,
``--config recipe.yaml`` reads them from YAML, and trailing ``key=value`` pairs override both.
A mistake the user can fix ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from peftlab import __version__, api
from peftlab.config import (
    DemoConfig,
    EvalConfig,
    CompareConfig,
    ExportConfig,
    ForgettingConfig,
    GenerateConfig,
    HarnessConfig,
    HolisticConfig,
    InspectPromptConfig,
    MergeAdaptersConfig,
    MergeConfig,
    TemplatesConfig,
    ReportConfig,
    ScoreConfig,
    ServeConfig,
    ChatConfig,
    SweepConfig,
    TrainConfig,
    build,
    flag,
    parse_overrides,
    read_recipe,
)
from peftlab.errors import UserError
from peftlab.training.distributed import OtherRankFailed, env_rank

# ----------------------------------------------------------------------------------------------
# Presentation helpers


class _TqdmBar:
    def __init__(self, description: str, total: int | None, unit: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, file=sys.stderr, leave=True)

    def update(self, n: int = 1, **stats: Any) -> None:
        if stats:
            self.bar.set_postfix(stats, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(description: str, total: int | None, unit: str = "it"):
    """A progress bar on stderr; under torchrun only rank 0 shows one (the others' is silent)."""
    if env_rank() != 0:
        from peftlab.progress import silent

        return silent(description, total, unit)
    return _TqdmBar(description, total, unit)


def say(message: str) -> None:
    if env_rank() == 0:  # under torchrun only rank 0 speaks
        print(message, flush=True)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into a report)."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ----------------------------------------------------------------------------------------------
# Commands


def cmd_train(config: TrainConfig) -> None:
    result = api.train(config, progress=progress, log=say)
    losses = [f"train loss {result.train_loss:.4f}"] if result.train_loss is not None else []
    losses += [f"validation loss {result.eval_loss:.4f}"] if result.eval_loss is not None else []
    say(f"trained {result.steps} steps in {result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s)"
        + ("; " + ", ".join(losses) if losses else ""))
    say(f"run: {result.run_dir}\nfinal: {result.final_dir}")


def cmd_eval(config: EvalConfig) -> None:
    result = api.evaluate(config, progress=progress, log=say)
    m = result.metrics
    say(table(["model", *ROUGE_KEYS, "bleu"], [[config.adapter or config.model, *(m[k] for k in ROUGE_KEYS), m["bleu"]]]))
    say(f"{m['num_examples']} examples; {m['bleu_signature']}")
    for key, (lo, hi) in m["intervals"].items():
        say(f"{key} 95% bootstrap interval: [{lo:.4f}, {hi:.4f}]")
    say(f"predictions: {result.predictions_file}\nmetrics: {result.metrics_file}")


def cmd_generate(config: GenerateConfig) -> None:
    texts = api.generate(config, progress=progress)
    if config.prompt is not None:
        say(texts[0])
    else:
        for text in texts:
            say(json.dumps({"text": text}))


def cmd_score(config: ScoreConfig) -> None:
    report = api.score_files(config)
    rows = [[k, report.aggregate[k]] for k in (*ROUGE_KEYS, "bleu", "sentence_bleu")]
    say(table(["metric", "value"], rows))
    say(f"{report.num_examples} examples; stemming {'on' if report.use_stemmer else 'off'}; {report.bleu_signature}")
    for key, (lo, hi) in report.intervals.items():
        say(f"{key} 95% bootstrap interval: [{lo:.4f}, {hi:.4f}]")


def cmd_demo(config: DemoConfig) -> None:
    say(f"peftlab demo: {config.methods.replace(',', ', ')} on {config.model} with {config.data} "
        f"({config.train_examples} training examples, {config.max_steps} steps, {config.test_examples} held-out examples)")
    _print_experiment(api.demo(config, log=say))


def cmd_harness(config: HarnessConfig) -> None:
    result = api.harness(config, progress=progress)
    say(table(["task", "metric", "value", "stderr", "n", "shots"],
              [[r["task"], r["metric"], r["value"], r["stderr"] if r["stderr"] is not None else "-", r["n"], r["shots"]]
               for r in result.rows()]))
    say(f"{result.seconds:.1f} s ({result.items_per_second:.2f} items/s)")
    if config.out:
        say(f"results: {Path(config.out) / 'results.json'}")


def cmd_holistic(config: HolisticConfig) -> None:
    result = api.holistic(config, progress=progress)
    say(table(["category", "metric", "value"], [[r["category"], r["metric"], r["value"]] for r in result.rows()]))
    if config.out:
        say(f"results: {Path(config.out) / 'holistic.json'}, plot: {Path(config.out) / 'holistic.png'}")


def cmd_merge(config: MergeConfig) -> None:
    if config.quantize:
        sys.stderr.write("peftlab: warning: the merged model holds dequantised 4-bit weights plus the adapter; it differs "
                         "from 4-bit inference by the quantisation error of the NF4 base\n")
    out = api.merge(config, progress=progress)
    say(f"merged model: {out}")


def cmd_merge_adapters(config: MergeAdaptersConfig) -> None:
    out = api.merge_adapters(config, progress=progress)
    record = json.loads((out / "merge.json").read_text())
    count = len(record["adapters"])
    say(f"{record['combination']} of {count} adapter{'s' if count > 1 else ''}, rank {record['rank']}: {out}")


def cmd_export(config: ExportConfig) -> None:
    result = api.export(config, progress=progress)
    merged = f"{result.adapter_type} adapter {config.adapter} merged; " if result.adapter_type else ""
    say(f"{merged}{result.tensors} tensors ({result.type}), {result.bytes / 2**20:.1f} MiB: {result.path}")
    if result.kept_f16:
        say(f"kept in f16 (rows not a multiple of 32): {', '.join(result.kept_f16)}")


def _print_experiment(result) -> None:
    from peftlab.experiment.report import markdown_table, rouge_table, split_failed, tradeoff_table

    rows, failed = split_failed(result.rows)
    say("")
    say(markdown_table(*rouge_table(rows)))
    say("")
    say(markdown_table(*tradeoff_table(rows)))
    for row in failed:
        say(f"not run: {row['label']}: {row['error']}")
    if result.skipped:
        say(f"\nreused finished results of: {', '.join(result.skipped)}")
    say(f"\nreport: {result.out / 'report.md'} and {result.out / 'report.html'}")
    if failed:  # exit code 2: a script must not take a comparison with a missing method for a complete one
        raise UserError(f"{len(failed)} of {len(result.rows)} requested variants did not run: "
                        f"{', '.join(row['label'] for row in failed)} (why: the 'not run' lines above); the tables hold the others")


def cmd_compare(config: CompareConfig) -> None:
    _print_experiment(api.compare(config, log=say))


def cmd_sweep(config: SweepConfig) -> None:
    _print_experiment(api.sweep(config, log=say))


def cmd_report(config: ReportConfig) -> None:
    path = api.report(config)
    say(f"report: {path} and {path.with_suffix('.html')}")


def cmd_inspect_prompt(config: InspectPromptConfig) -> None:
    rows = api.inspect_prompt(config)
    say(table(["virtual token", f"nearest {config.k} vocabulary tokens (cosine similarity)"],
              [[i, "  ".join(f"{tok!r} {sim:.3f}" for tok, sim in near)] for i, near in enumerate(rows)]))


def cmd_templates(config: TemplatesConfig) -> None:
    result = api.templates(config)
    if config.action == "list":
        say(table(["task", "fields", "templates", "metric", "task type", "answer choices"],
                  [[d["task"], ", ".join(d["fields"]), d["templates"], d["metric"], d["task_type"],
                    ", ".join(d["answer_choices"] or [])] for d in result]))
    elif config.action == "show":
        where, text = result
        say(f"# {where}\n{text}")
    else:
        for rendered in result:
            say(f"--- template: {rendered.template}\n[input]\n{rendered.input}\n[target]\n{rendered.target}")


def cmd_forgetting(config: ForgettingConfig) -> None:
    report = api.forgetting(config, progress=progress, log=say)
    say(report.table())
    say(f"{len(report.flagged)} of {len(report.rows)} tasks dropped by more than {report.threshold:g}"
        + (f": {', '.join(r.task for r in report.flagged)}" if report.flagged else ""))
    say(f"results: {Path(config.out) / 'forgetting.json'}")


def cmd_serve(config: ServeConfig) -> None:
    api.serve(config, progress=progress, log=say)


def cmd_chat(config: ChatConfig) -> None:
    def ask() -> str | None:
        try:
            return input("you> ")
        except EOFError:
            return None

    def show(text: str, finished: bool) -> None:
        print(text, end="\n" if finished else "", flush=True)

    say(f"chatting with {config.adapter or config.model}; an empty line is skipped, Ctrl-D ends")
    api.chat(config, ask=ask, show=show, progress=progress)


COMMANDS: dict[str, tuple[type, Callable]] = {
    "demo": (DemoConfig, cmd_demo),
    "train": (TrainConfig, cmd_train),
    "eval": (EvalConfig, cmd_eval),
    "generate": (GenerateConfig, cmd_generate),
    "score": (ScoreConfig, cmd_score),
    "merge": (MergeConfig, cmd_merge),
    "merge-adapters": (MergeAdaptersConfig, cmd_merge_adapters),
    "export": (ExportConfig, cmd_export),
    "compare": (CompareConfig, cmd_compare),
    "sweep": (SweepConfig, cmd_sweep),
    "report": (ReportConfig, cmd_report),
    "templates": (TemplatesConfig, cmd_templates),
    "inspect-prompt": (InspectPromptConfig, cmd_inspect_prompt),
    "harness": (HarnessConfig, cmd_harness),
    "holistic": (HolisticConfig, cmd_holistic),
    "forgetting": (ForgettingConfig, cmd_forgetting),
    "serve": (ServeConfig, cmd_serve),
    "chat": (ChatConfig, cmd_chat),
}


# ----------------------------------------------------------------------------------------------
# Parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


class _FlagOrValue(argparse.Action):
    """A flag that may take a value: ``--resume`` sets it, ``--resume PATH`` also sets ``value_dest``."""

    def __init__(self, *args: Any, value_dest: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_dest = value_dest

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        setattr(namespace, self.dest, True)
        if value is not None:
            setattr(namespace, self.value_dest, value)


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", default=None, metavar="FILE", help="Read options from a YAML recipe (flags and key=value win).")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %: "95%" would crash --help
        choices = f.metadata.get("choices")
        if hints[f.name] is bool and f"{f.name}_from" in hints:  # --resume, or --resume PATH (= --resume-from PATH)
            parser.add_argument(f"--{flag(f.name)}", dest=f.name, action=_FlagOrValue, value_dest=f"{f.name}_from",
                                nargs="?", metavar="PATH", default=argparse.SUPPRESS, help=help_text)
            continue
        if hints[f.name] is bool:
            parser.add_argument(f"--{flag(f.name)}", dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        if "list" in str(hints[f.name]):
            parser.add_argument(f"--{flag(f.name)}", dest=f.name, action="append", default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text + " (repeatable)")
            continue
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs=None if f.default is dataclasses.MISSING else "?", default=argparse.SUPPRESS,
                                choices=choices, help=help_text)
            continue
        required = f.default is dataclasses.MISSING
        suffix = " (required)" if required else f" (default: {f.default})".replace("%", "%%")
        parser.add_argument(f"--{flag(f.name)}", dest=f.name, default=argparse.SUPPRESS, choices=choices,
                            metavar=f.name.upper() if not choices else None, help=help_text + suffix)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Override any option, e.g. lr=1e-4 batch_size=4.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peftlab", description="Instruction fine-tuning and PEFT of LLMs, measured end to end.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (cls, _) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip()
        summary = doc.split(":", 1)[-1].strip().replace("%", "%%")  # help is %-formatted, a description is not
        p = sub.add_parser(name, help=summary, description=doc, allow_abbrev=False)
        _add_config_flags(p, cls)
    return parser


def _sweep_shorthand(argv: list[str]) -> list[str]:
    """``sweep --rank 1,2,4`` -> ``sweep --sweep rank=1,2,4`` (any training option that sweep itself lacks)."""
    if not argv or argv[0] != "sweep" or "--sweep" in argv:
        return argv
    own = {f"--{flag(f.name)}" for f in dataclasses.fields(SweepConfig)}
    train = {f"--{flag(f.name)}" for f in dataclasses.fields(TrainConfig)}
    for i, token in enumerate(argv[:-1]):
        if token in train and token not in own:
            return argv[:i] + argv[i + 2 :] + ["--sweep", f"{token[2:]}={argv[i + 1]}"]
    return argv


def parse(argv: list[str]) -> tuple[Any, Callable]:
    args = vars(build_parser().parse_args(_sweep_shorthand(argv)))
    command = args.pop("command")
    cls, run = COMMANDS[command]
    recipe = read_recipe(args["config"]) if args.get("config") else {}
    named = recipe.pop("command", command)
    if named != command:
        raise UserError(f"{args['config']} is a recipe for 'peftlab {named}', not 'peftlab {command}'")
    args.pop("config", None)
    overrides = parse_overrides(args.pop("overrides", []))
    config = build(cls, ("the config file", recipe), ("the command line", args), ("the key=value overrides", overrides))
    return config, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening; transformers' would interleave
    parsed = False
    try:
        config, run = parse(argv)
        parsed = True
        run(config)
    except UserError as e:  # exit code 128 + N: training stopped cleanly on signal N (SIGINT 130, SIGTERM 143)
        # under torchrun rank 0 speaks for all (a mistake in the command, met by every rank alike); another rank
        # only says what happened to it alone (out of memory on its device)
        if env_rank() == 0 or (parsed and not isinstance(e, OtherRankFailed)):
            where = f" (rank {env_rank()})" if env_rank() else ""
            sys.stderr.write(f"peftlab{where}: {'' if e.exit_code > 128 else 'error: '}{e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("peftlab: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
