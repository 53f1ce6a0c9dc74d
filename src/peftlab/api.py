"""The Python API: one function per CLI command, taking the same typed config (or its fields).

    import peftlab
    result = peftlab.train(model="smollm2-135m-instruct", data="demo:dialogsum", out="runs/sum", max_steps=30)
    metrics = peftlab.evaluate(model=str(result.final_dir), data="demo:dialogsum", out="runs/sum/eval").metrics
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from peftlab.config import (
    CompareConfig,
    DemoConfig,
    EvalConfig,
    ExportConfig,
    ForgettingConfig,
    GenerateConfig,
    HarnessConfig,
    HolisticConfig,
    InspectPromptConfig,
    MergeAdaptersConfig,
    MergeConfig,
    ReportConfig,
    ScoreConfig,
    ServeConfig,
    ChatConfig,
    SweepConfig,
    TemplatesConfig,
    TrainConfig,
)
from peftlab.data.encode import uses_chat_template
from peftlab.eval import evaluate as _evaluate
from peftlab.eval.generate import generate as _generate
from peftlab.eval.score import ScoreReport, read_texts, score
from peftlab.errors import UserError
from peftlab.models import load_for_inference
from peftlab.outputs import RunFolder, check_output_path, write_atomic
from peftlab.progress import ProgressFactory, silent
from peftlab.training.loop import TrainResult
from peftlab.training.distributed import env_rank
from peftlab.training.loop import train as _train

Log = Callable[[str], None]


def _config(cls: type, config: Any, options: dict) -> Any:
    if config is not None and options:
        raise TypeError("pass either a config object or keyword options, not both")
    return config if config is not None else cls(**options)


def train(config: TrainConfig | None = None, *, progress: ProgressFactory = silent, log: Log = lambda _: None, **options) -> TrainResult:
    """Fine-tune a model (``peftlab train``)."""
    return _train(_config(TrainConfig, config, options), progress=progress, log=log)


def evaluate(config: EvalConfig | None = None, *, progress: ProgressFactory = silent, log: Log = lambda _: None, **options) -> _evaluate.EvalResult:
    """Generate on a split and score it (``peftlab eval``); under torchrun the examples are split over the ranks."""
    config = _config(EvalConfig, config, options)
    with _evaluation_session(config) as config:
        return _evaluate.evaluate(config, progress=progress, log=log)


@contextlib.contextmanager
def _evaluation_session(config):
    """Under torchrun with several processes: the process group, and ``config`` on this rank's device."""
    from peftlab.training.distributed import Distributed

    dist = Distributed.for_evaluation()
    with dist.session(config.device) as device:
        yield dataclasses.replace(config, device=device) if device != config.device else config


def generate(config: GenerateConfig | None = None, *, progress: ProgressFactory = silent, **options) -> list[str]:
    """Greedy completions of a prompt or a file of prompts (``peftlab generate``)."""
    config = _config(GenerateConfig, config, options)
    prompts = [config.prompt] if config.prompt is not None else read_texts(config.input, fields=("prompt", "text"))
    if not prompts:
        raise UserError(f"no prompts in {config.input}")
    loaded = load_for_inference(config.model, config.adapter, config.dtype, config.device, config.trust_pickle, progress)
    chat = uses_chat_template(loaded.tokenizer, config.chat_template)
    return _generate(loaded.model, loaded.tokenizer, prompts, is_seq2seq=loaded.is_seq2seq, chat=chat,
                     max_new_tokens=config.max_new_tokens, max_length=config.max_length,
                     batch_size=config.batch_size, progress=progress).texts


def score_files(config: ScoreConfig | None = None, **options) -> ScoreReport:
    """ROUGE and BLEU of a predictions file against a references file (``peftlab score``)."""
    config = _config(ScoreConfig, config, options)
    inputs = [("--predictions", config.predictions), ("--references", config.references)]
    outputs = [check_output_path(path, flag, inputs)
               for flag, path in (("--json", config.json), ("--per-example", config.per_example)) if path]
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise UserError(f"--json and --per-example both name {config.json}; give two different files")
    report = score(read_texts(config.predictions), read_texts(config.references),
                   use_stemmer=config.use_stemmer, bootstrap=config.bootstrap)
    if config.json:
        payload = {**report.aggregate, "bleu_signature": report.bleu_signature, "num_examples": report.num_examples,
                   "use_stemmer": report.use_stemmer, "intervals": {k: list(v) for k, v in report.intervals.items()}}
        _write_file(Path(config.json), json.dumps(payload, indent=2) + "\n")
    if config.per_example:
        _write_file(Path(config.per_example), "".join(json.dumps(row) + "\n" for row in report.per_example))
    return report


def _write_file(path: Path, text: str) -> None:
    """Atomically, creating missing parent folders (the place was checked before the work)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def merge(config: MergeConfig | None = None, *, progress: ProgressFactory = silent, **options) -> Path:
    """Fold an adapter into its base model and save a plain HF model folder (``peftlab merge``)."""
    from peftlab.peft import merge_and_unload

    config = _config(MergeConfig, config, options)
    out = check_output_path(config.out, "--out", [("--model", config.model), ("--adapter", config.adapter)], replaces_folder=True)
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise UserError(f"--out {out} already holds files; pass --overwrite to replace them (they stay until the merged "
                        "model is written), or choose another --out")
    folder = RunFolder.prepare(config.out, overwrite=config.overwrite, resume=False)
    try:
        if config.quantize == "nf4":  # merge into the rounded weights the adapter was trained on
            from peftlab.peft import dequantize_model, load_adapter

            loaded = load_for_inference(config.model, None, config.dtype, "cpu", progress=progress, quantize="nf4")
            model = load_adapter(dequantize_model(loaded.model), config.adapter, trust_pickle=config.trust_pickle)
        else:
            loaded = load_for_inference(config.model, config.adapter, config.dtype, "cpu", config.trust_pickle, progress)
            model = loaded.model
        model = merge_and_unload(model)
        model.save_pretrained(folder.work)
        loaded.tokenizer.save_pretrained(folder.work)
    except BaseException:
        folder.abandon()
        raise
    folder.commit()
    return folder.final


def merge_adapters(config: MergeAdaptersConfig | None = None, *, progress: ProgressFactory = silent, **options) -> Path:
    """Combine LoRA adapters into one new LoRA adapter folder, as peft's ``add_weighted_adapter`` (``peftlab merge-adapters``)."""
    from peftlab.models import load_structure
    from peftlab.peft.merge import combine_adapters, read_lora, save_combined
    from peftlab.serve.adapters import parse_adapter_specs

    config = _config(MergeAdaptersConfig, config, options)
    named = parse_adapter_specs(config.adapter)
    inputs = [("--model", config.model)] + [("--adapter", folder) for folder in named.values()]
    out = check_output_path(config.out, "--out", inputs, replaces_folder=True)
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise UserError(f"--out {out} already holds files; pass --overwrite to replace them (they stay until the new "
                        "adapter is written), or choose another --out")
    adapters = [read_lora(name, folder, config.trust_pickle) for name, folder in named.items()]
    combined = combine_adapters(load_structure(config.model, progress), adapters, config.weight_values, config.combination,
                                config.density, config.seed, base_model_name_or_path=config.model)
    record = {
        "combination": combined.combination, "requested": config.combination, "rank": combined.rank,
        "weights": config.weight_values, "density": config.density, "seed": config.seed, "model": config.model,
        "adapters": [{"name": a.name, "path": str(a.folder), "rank": a.lora.rank, "scaling": a.lora.scaling} for a in adapters],
    }
    folder = RunFolder.prepare(config.out, overwrite=config.overwrite, resume=False)
    try:
        save_combined(combined, folder.work, record)
    except BaseException:
        folder.abandon()
        raise
    folder.commit()
    return folder.final


def export(config: ExportConfig | None = None, *, progress: ProgressFactory = silent, **options):
    """Merge an adapter into a Llama-architecture model and write a GGUF file for llama.cpp / Ollama (``peftlab export``)."""
    from peftlab.gguf_export import export_gguf

    config = _config(ExportConfig, config, options)
    return export_gguf(config.model, config.out, config.adapter, config.type, trust_pickle=config.trust_pickle,
                       overwrite=config.overwrite, progress=progress)


def compare(config: CompareConfig | None = None, *, log: Log = lambda _: None, **options):
    """Run methods side by side and write the report (``peftlab compare``)."""
    from peftlab.experiment.compare import compare as _compare

    return _compare(_config(CompareConfig, config, options), log=log)


def sweep(config: SweepConfig | None = None, *, log: Log = lambda _: None, **options):
    """One method, one option over several values (``peftlab sweep``)."""
    from peftlab.experiment.compare import sweep as _sweep

    return _sweep(_config(SweepConfig, config, options), log=log)


def report(config: ReportConfig | None = None, **options) -> Path:
    """Rebuild report.md / report.html of a compare or sweep folder (``peftlab report``)."""
    from peftlab.experiment.report import write_report

    return write_report(_config(ReportConfig, config, options).run_dir)


def inspect_prompt(config: InspectPromptConfig | None = None, **options) -> list[list[tuple[str, float]]]:
    """Nearest vocabulary tokens (cosine similarity) of each soft-prompt vector (``peftlab inspect-prompt``)."""
    from peftlab.models import load_model
    from peftlab.peft.inspect import load_prompt_embeddings, nearest_tokens
    from peftlab.peft.formats import read_adapter_config

    config = _config(InspectPromptConfig, config, options)
    prompt = load_prompt_embeddings(config.adapter)
    base = config.model or read_adapter_config(config.adapter).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config.adapter} does not name its base model; pass --model")
    loaded = load_model(base, device="cpu")
    return nearest_tokens(loaded.model, loaded.tokenizer, prompt, k=config.k)


def templates(config: TemplatesConfig | None = None, **options):
    """The template library (``peftlab templates``): list -> rows, show -> (where, YAML), render -> rendered examples."""
    from peftlab.data import templates as t

    config = _config(TemplatesConfig, config, options)
    if config.action == "list":
        return [t.describe(task) for task in t.list_templates()]
    if config.action == "show":
        return t.template_source(config.name)
    record = t.example_record(config.record, config.data, config.index)
    return t.render_all(t.load_task(config.name), record, config.template)


def forgetting(config: ForgettingConfig | None = None, *, progress: ProgressFactory = silent, log: Log = lambda _: None, **options):
    """Evaluate a held-out suite before and after tuning (``peftlab forgetting``); writes forgetting.json/.md."""
    from peftlab.experiment.forgetting import forgetting_report

    config = _config(ForgettingConfig, config, options)
    out = check_output_path(config.out, "--out", [("--model", config.model), ("--tuned", config.tuned), ("--adapter", config.adapter),
                                                  ("--suite", config.suite)], writes=("forgetting.json", "forgetting.md"))
    if (out / "forgetting.json").exists() and not config.overwrite:
        raise UserError(f"{out} already holds forgetting.json; pass --overwrite or choose another --out")
    report = forgetting_report(config, progress=progress, log=log)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "forgetting.json", json.dumps(report.to_dict(), indent=2) + "\n")
    write_atomic(out / "forgetting.md", f"{report.table()}\n\nExamples:\n\n{report.examples_table()}\n")
    return report


def _harness_inputs(config: HarnessConfig) -> list[tuple[str, str | None]]:
    return [("--model", config.model), ("--adapter", config.adapter), ("--data-root", config.data_root),
            *(("--tasks", task.strip()) for task in config.tasks.split(","))]


def harness(config: HarnessConfig | None = None, *, progress: ProgressFactory = silent, **options):
    """Benchmark tasks scored as lm-evaluation-harness does (``peftlab harness``); writes results.json with --out."""
    from peftlab.eval.harness import run_harness_config, write_results

    config = _config(HarnessConfig, config, options)
    if config.out:
        check_output_path(config.out, "--out", _harness_inputs(config), writes=("results.json",))
    with _evaluation_session(config) as config:  # under torchrun: each task's items split over the ranks
        result = run_harness_config(config, progress=progress)
    if config.out and env_rank() == 0:
        write_results(result, Path(config.out) / "results.json")
    return result


def holistic(config: HolisticConfig | None = None, *, progress: ProgressFactory = silent, **options):
    """HELM-style holistic report (``peftlab holistic``); writes holistic.json and holistic.png with --out."""
    from peftlab.eval.harness import write_results
    from peftlab.eval.holistic import plot_holistic, run_holistic_config

    config = _config(HolisticConfig, config, options)
    if config.out:
        check_output_path(config.out, "--out", _harness_inputs(config), writes=("holistic.json", "holistic.png"))
    result = run_holistic_config(config, progress=progress)
    if config.out:
        write_results(result, Path(config.out) / "holistic.json")
        plot_holistic(result, Path(config.out) / "holistic.png")
    return result


def demo(config: DemoConfig | None = None, *, log: Log = lambda _: None, **options):
    """Zero-shot baseline, LoRA and full fine-tuning side by side on the embedded model (``peftlab demo``).

    A ``peftlab compare`` with small, fixed settings: rerunning it reuses what already finished.
    """
    return compare(_config(DemoConfig, config, options).compare_config(), log=log)


# ----------------------------------------------------------------------------------------------
# Serving (peftlab serve, peftlab chat)


def serve(config: ServeConfig | None = None, *, progress: ProgressFactory = silent, log: Log = lambda _: None,
          **options) -> None:
    """Serve the model and its adapters over the OpenAI API until interrupted (``peftlab serve``)."""
    config = _config(ServeConfig, config, options)
    try:
        from peftlab.serve.server import Server, build, check
    except ImportError as e:
        raise UserError(f"peftlab serve needs {e.name}: pip install 'peftlab[serve]'") from None

    check(config)  # a mistake in the flags fails before the port is taken
    server = Server(config.host, config.port)  # a busy port fails before the model loads
    try:
        engine, app = build(config, progress=progress)
    except BaseException:
        server.socket.close()
        raise
    try:
        names = ", ".join([config.name or config.model, *engine.served()])
        log(f"serving {names} at {server.url}/v1 (OpenAI API; Ctrl-C stops)")
        server.run(app)
    finally:
        engine.stop()


def chat(config: ChatConfig | None = None, *, ask: Callable[[], str | None], show: Callable[[str, bool], None],
         progress: ProgressFactory = silent, **options) -> None:
    """A conversation through the serving engine (``peftlab chat``): ``ask()`` gives the user's turns (None
    ends it) and ``show(text, finished)`` receives the answer as it is generated."""
    import threading

    from peftlab.models import load_model
    from peftlab.data.encode import chat_prompt_ids
    from peftlab.serve.engine import BASE, Engine, Request, Sampling

    config = _config(ChatConfig, config, options)
    named = {"adapter": Path(config.adapter)} if config.adapter else {}
    if config.adapter:
        from peftlab.peft.formats import read_adapter_config

        read_adapter_config(config.adapter)  # a wrong folder fails before the model loads
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, progress=progress)
    if not getattr(loaded.tokenizer, "chat_template", None):
        raise UserError(f"{config.model} has no chat template: use peftlab generate --prompt TEXT for a plain completion")
    engine = Engine(loaded, named, max_adapters=1, max_batch=1, max_queue=1, trust_pickle=config.trust_pickle)
    engine.start()
    messages = [{"role": "system", "content": config.system}] if config.system else []
    try:
        while (line := ask()) is not None:
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            done = threading.Event()

            def on_event(text: str, finish: str | None) -> None:
                show(text, finish is not None)
                if finish is not None:
                    done.set()

            sampling = Sampling(max_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p,
                                seed=config.seed)
            request = Request("adapter" if named else BASE, chat_prompt_ids(loaded.tokenizer, messages), sampling, on_event)
            engine.submit(request)
            done.wait()
            if request.finish_reason.startswith("error"):
                raise UserError(f"the engine failed: {request.finish_reason.removeprefix('error: ')}")
            messages.append({"role": "assistant", "content": request.text})
    finally:
        engine.stop()
