"""``peftlab eval``: generate on a held-out split and score it.

Writes ``predictions.jsonl`` (one line per example: index, prompt, reference, prediction and its
per-example scores) and ``metrics.json`` (ROUGE-1/2/L/Lsum means, corpus BLEU with its sacrebleu
signature, the course notes' sentence BLEU, optional bootstrap intervals, generation speed).
Both files are written to a temporary name and renamed, so an interrupted evaluation never
leaves a half-written file, and existing results are only replaced with ``--overwrite``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftlab.config import EvalConfig, to_dict
from peftlab.data.encode import format_prompt, uses_chat_template
from peftlab.data.pipeline import Example, prepare
from peftlab.errors import UserError
from peftlab.outputs import check_output_path, write_atomic
from peftlab.memory import peak_memory
from peftlab.eval.generate import Generation, generate
from peftlab.eval.score import score
from peftlab.models import LoadedModel, load_for_inference
from peftlab.peft import virtual_token_count
from peftlab.progress import ProgressFactory, silent
from peftlab.training.distributed import Distributed

OUTPUT_FILES = ("predictions.jsonl", "metrics.json")


@dataclass
class EvalResult:
    metrics: dict
    predictions_file: Path
    metrics_file: Path
    predictions: list[str]


def select_examples(config: EvalConfig) -> tuple[list[Example], list[Example]]:
    """(examples to evaluate, few-shot examples drawn from the training split)."""
    data = prepare(config.data, config.template, config.split_fractions, config.split_seed, require_train=False)
    examples = data.examples(config.split)[: config.limit]
    if not examples:
        raise UserError(f"the {config.split} split of {config.data} is empty with --split-fractions {config.split_fractions}; "
                        "change --split or --split-fractions (--split all evaluates every record)")
    shots: list[Example] = []
    if config.fewshot:
        train = data.splits["train"]
        if len(train) < config.fewshot:
            raise UserError(f"--fewshot {config.fewshot} takes its examples from the train split, which has {len(train)} with "
                            f"--split-fractions {config.split_fractions}; give the train split a larger fraction or lower --fewshot")
        shots = random.Random(config.split_seed).sample(train, config.fewshot)
    return examples, shots


@dataclass
class FewShotPrompts:
    prompts: list[str]
    prompt_tokens: list[int]  # tokens of each formatted prompt, as the model sees it
    dropped: int  # few-shot examples left out because they did not fit the context


def build_prompts(tokenizer, examples: list[Example], shots: list[Example], budget: int, chat: bool, is_seq2seq: bool) -> FewShotPrompts:
    """Each prompt preceded by the few-shot examples (prompt, then its completion), as many as fit ``budget`` tokens.

    Few-shot examples are dropped from the front (the last ones stay next to the query) until the prompt fits.
    """
    prompts, lengths, dropped = [], [], 0
    for ex in examples:
        kept = list(shots)
        while True:
            text = "\n\n".join([f"{s.prompt}\n{s.completion}" for s in kept] + [ex.prompt])
            n = len(tokenizer(format_prompt(tokenizer, text, chat, is_seq2seq), add_special_tokens=is_seq2seq or not chat)["input_ids"])
            if n <= budget or not kept:
                break
            kept.pop(0)
            dropped += 1
        prompts.append(text)
        lengths.append(n)
    return FewShotPrompts(prompts, lengths, dropped)


def evaluate(config: EvalConfig, progress: ProgressFactory = silent, log: Callable[[str], None] = lambda _: None,
             loaded: LoadedModel | None = None) -> EvalResult:
    """Generate for every example of the split and score against its reference.

    ``loaded`` lets a caller that already holds the model (the demo) skip loading it again.
    """
    inputs = [("--model", config.model), ("--adapter", config.adapter), ("--data", config.data), ("--template", config.template)]
    out = check_output_path(config.out, "--out", inputs, writes=OUTPUT_FILES)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not config.overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them or choose another --out")
    examples, shots = select_examples(config)
    if loaded is None:
        loaded = load_for_inference(config.model, config.adapter, config.dtype, config.device, config.trust_pickle, progress,
                                    config.quantize)
    chat = uses_chat_template(loaded.tokenizer, config.chat_template)
    budget = config.max_length if loaded.context_length is None else min(config.max_length, loaded.context_length - config.max_new_tokens)
    budget -= virtual_token_count(loaded.model)  # a soft prompt / prefix takes positions too
    prompts = build_prompts(loaded.tokenizer, examples, shots, budget, chat, loaded.is_seq2seq)
    dist = Distributed.current()  # under torchrun each rank generates for every world_size-th prompt
    generation = generate(
        loaded.model, loaded.tokenizer, dist.shard(prompts.prompts), is_seq2seq=loaded.is_seq2seq, chat=chat,
        max_new_tokens=config.max_new_tokens, max_length=budget, batch_size=config.batch_size, progress=progress,
    )
    counts = dist.gather((generation.new_tokens, generation.seconds))
    generation = Generation(dist.unshard(generation.texts), sum(c[0] for c in counts), max(c[1] for c in counts))
    references = [ex.completion for ex in examples]
    report = score(generation.texts, references, use_stemmer=config.use_stemmer, bootstrap=config.bootstrap)

    metrics = {
        **report.aggregate,
        "bleu_signature": report.bleu_signature,
        "intervals": {k: list(v) for k, v in report.intervals.items()},
        "num_examples": len(examples),
        "use_stemmer": config.use_stemmer,
        "split": config.split,
        "model": config.model,
        "adapter": config.adapter,
        "chat_template": chat,
        "generation": {"new_tokens": generation.new_tokens, "seconds": generation.seconds,
                       "tokens_per_second": generation.tokens_per_second,
                       "latency_per_example_s": generation.seconds / len(examples),
                       "mean_prompt_tokens": sum(prompts.prompt_tokens) / len(examples)},
        "fewshot": {"k": config.fewshot, "dropped_examples": prompts.dropped},
        "peak_memory": peak_memory(next(loaded.model.parameters()).device),
        "config": to_dict(config),
    }
    lines = [
        json.dumps({"index": ex.index, "prompt": prompt, "reference": ref, "prediction": pred, "scores": scores})
        for ex, prompt, ref, pred, scores in zip(examples, prompts.prompts, references, generation.texts, report.per_example)
    ]
    if dist.is_main:  # under torchrun rank 0 writes (every rank has the same results)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "predictions.jsonl", "\n".join(lines) + "\n")
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return EvalResult(metrics, out / "predictions.jsonl", out / "metrics.json", generation.texts)
