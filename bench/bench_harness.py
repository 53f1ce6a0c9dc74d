"""Benchmark evaluation: ``peftlab harness`` vs lm-evaluation-harness (``simple_evaluate``, model "hf").

    .venv/bin/python bench/bench_harness.py [--quick] [--subject NAME] [--limit 40] [--bbh-limit 16] [--rounds 2] [--threads N]

The embedded model (smollm2-135m-instruct), converted once into a local HF folder, is loaded by
both sides from that folder (the alias's cached folder) (lm-eval through its registry's ``hf`` model, peftlab with
``load_model``); loading is not timed. Three runs on the same documents:

- MMLU one subject (high_school_psychology, the shared val split), 0-shot and 5-shot (few-shot
  from dev, first_n): lm-eval's own ``mmlu_<subject>`` config pointed at the CSV files;
- BBH one task (boolean_expressions), zero-shot generation: lm-eval's ``bbh_zeroshot_<task>``
  pointed at the JSON file, its default 256 new tokens on both sides (the embedded model never
  writes a stop string here, so every row runs all 256 steps).

Where peftlab gains: log-likelihoods without the full-vocabulary logits of every position, and the
prefix all of a task's prompts share (the subject's description; with 5 shots the examples too)
run once, its KV cache expanded to each batch. Generation runs the same batches through the same
``generate`` as lm-eval (a shared prompt start sits at different positions under left padding, and
changing the batch changes float rounding, so greedy text could differ): its ratio stays near 1.

Each run alternates the two sides (A B, then B A, ...), timing the whole evaluation call (task
building, data reading, scoring, metrics). Per item we check the results are identical: prompt,
predicted choice, acc, acc_norm, is_greedy, log-likelihoods within 1e-4 (the parity tests'
tolerance), generated text and exact match. Prints a Markdown table; writes
``bench/results/harness.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).parent / "results" / "harness.json"
TOL = 1e-4


# ------------------------------------------------------------------------------ lm-eval task configs


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def mmlu_config(subject: str) -> dict:
    """lm-eval's ``mmlu_<subject>`` reading the shared val/dev CSV files (the hub's cais/mmlu schema)."""
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(lm_eval_tasks_dir() / "mmlu" / "default" / f"mmlu_{subject}.yaml")
    columns = ["question", "A", "B", "C", "D", "answer"]

    def to_cais_format(dataset):
        return dataset.map(lambda d: {"question": d["question"], "subject": subject,
                                      "choices": [d["A"], d["B"], d["C"], d["D"]], "answer": "ABCD".index(d["answer"])},
                           remove_columns=columns)

    files = {"test": str(DATA / "mmlu" / "val" / f"{subject}_val.csv"),
             "dev": str(DATA / "mmlu" / "dev" / f"{subject}_dev.csv")}
    config.update(dataset_path="csv", dataset_name=None, process_docs=to_cais_format,
                  dataset_kwargs={"data_files": files, "column_names": columns, "keep_default_na": False,
                                  "features": datasets.Features({c: datasets.Value("string") for c in columns})},
                  metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    return config


def bbh_config(task: str, max_gen_toks: int | None) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(lm_eval_tasks_dir() / "bbh" / "zeroshot" / f"{task}.yaml", resolve_func=False)
    config.pop("filter_list", None)  # strict match: the harness's default take_first
    config.update(dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {"test": str(DATA / "bbh" / f"{task}.json")}, "field": "examples"})
    if max_gen_toks is not None:
        config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": max_gen_toks}
    return config


# ------------------------------------------------------------------------------------------ sides


def run_lm_eval(lm, config: dict, limit: int, shots: int | None) -> dict[int, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=[config], task_manager=TaskManager(include_defaults=False),
                                  limit=limit, num_fewshot=shots, log_samples=True, bootstrap_iters=0)
    (samples,) = out["samples"].values()
    return {s["doc_id"]: s for s in samples}


def run_peftlab(loaded, task: str, limit: int, shots: int | None, split: str | None, max_gen_toks: int | None,
                batch_size: int):
    from peftlab.config import HarnessConfig
    from peftlab.eval.harness import run_harness_config

    config = HarnessConfig(model=loaded.name, tasks=task, data_root=str(DATA), split=split, limit=limit,
                           num_fewshot=shots, batch_size=batch_size, max_gen_toks=max_gen_toks, device="cpu")
    (result,) = run_harness_config(config, loaded=loaded).tasks.values()
    return result


def compare(result, reference: dict[int, dict]) -> dict:
    """Per-item equality of peftlab's items with lm-eval's samples; returns counts and the worst ll difference."""
    worst, mismatches = 0.0, []
    for item in result.items:
        ref = reference[item["index"]]
        same = item["prompt"] == ref["arguments"][0][0]
        if "generation" in item:
            same &= item["generation"] == ref["filtered_resps"][0] and item["exact_match"] == ref["exact_match"]
        else:
            ref_lls = [r[0] for r in ref["filtered_resps"]]
            worst = max([worst] + [abs(a - b) for a, b in zip(ref_lls, item["loglikelihoods"])])
            same &= item["is_greedy"] == [bool(r[1]) for r in ref["filtered_resps"]]
            same &= item["acc"] == ref["acc"] and item["acc_norm"] == ref["acc_norm"]
            same &= max(abs(a - b) for a, b in zip(ref_lls, item["loglikelihoods"])) < TOL
        if not same:
            mismatches.append(item["index"])
    return {"items": len(result.items), "mismatches": mismatches, "max_ll_diff": worst,
            "equal": not mismatches and len(result.items) == len(reference)}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="8 documents per run, 32 new tokens, one round")
    parser.add_argument("--subject", default="high_school_psychology", help="MMLU subject (shared val split)")
    parser.add_argument("--bbh-task", default="boolean_expressions")
    parser.add_argument("--limit", type=int, default=40, help="MMLU documents per run")
    parser.add_argument("--bbh-limit", type=int, default=16, help="BBH documents (each generates up to 256 tokens)")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="BBH new tokens (default: 256, lm-eval's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="timed A/B pairs per run, order alternating")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.limit, args.bbh_limit, args.rounds, args.max_gen_toks = 8, 8, 1, args.max_gen_toks or 32
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    from lm_eval.api.registry import get_model

    from peftlab.models import cache_dir, load_model

    load_model("smollm2-135m-instruct")  # converts the embedded GGUF into the cached HF folder on first use
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    lm = get_model("hf")(pretrained=str(folder), batch_size=args.batch_size, device="cpu", dtype="float32")
    loaded = load_model(str(folder))

    runs = [(f"mmlu_{args.subject} 0-shot", f"mmlu_{args.subject}", mmlu_config(args.subject), 0, "val", args.limit),
            (f"mmlu_{args.subject} 5-shot", f"mmlu_{args.subject}", mmlu_config(args.subject), 5, "val", args.limit),
            (f"bbh_{args.bbh_task} 0-shot", f"bbh_{args.bbh_task}", bbh_config(args.bbh_task, args.max_gen_toks), None,
             None, args.bbh_limit)]
    rows = []
    for label, task, config, shots, split, limit in runs:
        times: dict[str, list[float]] = {"lm-eval": [], "peftlab": []}
        checks = []
        for r in range(args.rounds):
            order = ("lm-eval", "peftlab") if r % 2 == 0 else ("peftlab", "lm-eval")
            for side in order:
                start = time.perf_counter()
                if side == "lm-eval":
                    reference = run_lm_eval(lm, config, limit, shots)
                else:
                    result = run_peftlab(loaded, task, limit, shots, split, args.max_gen_toks, args.batch_size)
                times[side].append(time.perf_counter() - start)
            checks.append(compare(result, reference))
        ref_s, ours_s = statistics.median(times["lm-eval"]), statistics.median(times["peftlab"])
        rows.append({"run": label, "items": checks[-1]["items"], "lm_eval_s": ref_s, "peftlab_s": ours_s,
                     "speedup": ref_s / ours_s, "times": times, "identical": all(c["equal"] for c in checks),
                     "max_ll_diff": max(c["max_ll_diff"] for c in checks),
                     "mismatches": sorted({i for c in checks for i in c["mismatches"]})})

    total_ref, total_ours = sum(r["lm_eval_s"] for r in rows), sum(r["peftlab_s"] for r in rows)
    print(f"model smollm2-135m-instruct (float32, cpu), batch {args.batch_size}, "
          f"{args.rounds} round(s), {torch.get_num_threads()} threads; median seconds per side")
    print("| run | items | lm-eval s | peftlab s | speed-up | per-item identical | max |ll diff| |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['items']} | {r['lm_eval_s']:.2f} | {r['peftlab_s']:.2f} | {r['speedup']:.2f}x | "
              f"{'yes' if r['identical'] else 'NO ' + str(r['mismatches'])} | {r['max_ll_diff']:.1e} |")
    print(f"| all | {sum(r['items'] for r in rows)} | {total_ref:.2f} | {total_ours:.2f} | {total_ref / total_ours:.2f}x | "
          f"{'yes' if all(r['identical'] for r in rows) else 'NO'} | |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": vars(args), "threads": torch.get_num_threads(), "runs": rows,
                                   "total": {"lm_eval_s": total_ref, "peftlab_s": total_ours,
                                             "speedup": total_ref / total_ours}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
