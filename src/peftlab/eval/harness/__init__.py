"""Benchmark harness: lm-evaluation-harness-compatible task files, built-in MMLU / BBH / BIG-bench, scoring.

``run_harness_config(config)`` (a :class:`~peftlab.config.HarnessConfig`), or its keyword form
``run_harness(model, tasks, ...)``, evaluates and returns a :class:`HarnessResult`;
``write_results(result, path)`` saves it as JSON. See :mod:`.runner` for the options,
:mod:`.tasks` for the task YAML format and :mod:`.families` for built-in task names.
"""

from peftlab.eval.harness.families import builtin_names, resolve_tasks
from peftlab.eval.harness.runner import (
    HarnessResult,
    TaskResult,
    build_prompts,
    evaluate_task,
    run_harness,
    run_harness_config,
    write_results,
)
from peftlab.eval.harness.scoring import generate_until, loglikelihoods
from peftlab.eval.harness.tasks import Task, TaskConfig, load_task_file

__all__ = [
    "HarnessResult",
    "Task",
    "TaskConfig",
    "TaskResult",
    "build_prompts",
    "builtin_names",
    "evaluate_task",
    "generate_until",
    "load_task_file",
    "loglikelihoods",
    "resolve_tasks",
    "run_harness",
    "run_harness_config",
    "write_results",
]
