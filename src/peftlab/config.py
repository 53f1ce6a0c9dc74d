"""Typed configs for every command, and how they are built from the CLI, YAML recipes and overrides.

Each command has one flat dataclass (``TrainConfig``, ``EvalConfig`` ...). Every field carries its
help text in ``metadata["help"]``; the CLI builds its flags from those fields, so ``--help``,
recipes and the Python API can never disagree. Values are merged in this order, later wins:

    field defaults  <  --config recipe.yaml  <  --flags  <  key=value overrides

Options several commands take (``--dtype``, ``--device``, ``--chat-template`` ...) are declared once,
by the ``*_option()`` functions. Unknown keys are rejected with a suggestion; ``__post_init__``
rejects contradictory settings, and ``TrainConfig`` the method's own (``--rank 0``) before a model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlab import method_table
from peftlab.errors import UserError
from peftlab.tracking import parse_report_to


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, positional: bool = False,
           **kw: Any) -> Any:
    """A dataclass field with its help text (and allowed values) for the CLI and recipes.

    ``positional`` fields are command-line arguments without a flag (``peftlab templates show NAME``).
    """
    metadata = {"help": help, "choices": choices, "positional": positional}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


REQUIRED = dataclasses.MISSING
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------
# Options several commands take: declared once (a command may say more in its own help text)


def report_to_option() -> Any:
    return option(None, "Experiment trackers that also receive the metrics: tensorboard, mlflow, or both comma-separated "
                        "(default: none; needs pip install 'peftlab[tracking]').")


def dtype_option(help: str = "Model weights dtype.") -> str:
    return option("float32", help, choices=DTYPES)


def device_option() -> str:
    return option("auto", "cpu, cuda, cuda:N or auto (cuda when available).")


def chat_template_option(help: str = "Wrap prompts in the tokenizer's chat template: auto, on, off.") -> str:
    return option("auto", help, choices=("auto", "on", "off"))


def trust_pickle_option(help: str = "Allow loading a pickled (.bin) adapter.") -> bool:
    return option(False, help)


def quantize_option(help: str) -> str | None:
    return option(None, help, choices=("nf4",))


def bootstrap_option() -> int:
    return option(0, "Bootstrap resamples for 95% intervals of the ROUGE means (0: none).")


# ----------------------------------------------------------------------------------------------
# Shared pieces (plain functions: dataclass inheritance would reorder fields and their --help)


def _check_choice(name: str, value: Any, choices: tuple | None) -> None:
    if choices is not None and value is not None and value not in choices:
        raise UserError(f"--{flag(name)} must be one of {', '.join(map(str, choices))}, not {value!r}")


def validate_choices(config: Any) -> None:
    for f in dataclasses.fields(config):
        _check_choice(f.name, getattr(config, f.name), f.metadata.get("choices"))


def _positive(config: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise UserError(f"--{flag(name)} must be {bound}, got {value}")


def flag(name: str) -> str:
    return name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# Commands


@dataclass
class TrainConfig:
    """``peftlab train``: fine-tune a model on instruction data (loss on completion tokens only)."""

    model: str = option(REQUIRED, "Base model: a local HF folder, a hub id, a .gguf file or an alias (smollm2-135m-instruct).")
    data: str | None = option(None, "Training data: .jsonl/.json/.csv/.parquet file, a datasets folder, hf:NAME[:CONFIG][@SPLIT] or "
                                     "demo:dialogsum (or give --task for a multi-task mixture).")
    out: str = option(REQUIRED, "Run folder to create (config, metrics.jsonl, checkpoints/, final/).", kw_only=True)
    task: list[str] | None = option(None, "Multi-task instruction tuning: NAME[:TEMPLATE]=SOURCE, repeat --task for each task "
                                          "(e.g. --task sum=demo:dialogsum --task rating=demo:reviews).")
    mix: str = option("proportional", "How --task mixtures sample: proportional to size (with --mix-cap, FLAN), temperature, or equal.",
                      choices=("proportional", "temperature", "equal"))
    mix_cap: int | None = option(None, "Examples-proportional mixing counts at most this many examples of a task.")
    mix_temperature: float = option(1.0, "Temperature T of temperature mixing: rate ~ size^(1/T).")
    mix_size: int | None = option(None, "Training examples drawn from the mixture (default: one capped pass over all tasks).")
    method: str = option("full", "Fine-tuning method: full (every weight); reparameterising lora, dora; additive adapter "
                                 "(bottleneck), prompt (soft prompt), prefix, ia3; selective bitfit, layernorm, selective.",
                         choices=method_table.NAMES)
    template: str | None = option(None, "Prompt template: a built-in name or a YAML file. Default: detected from the data's fields.")
    split_fractions: str = option("0.8,0.1,0.1", "train,validation,test fractions of the data (sum to 1).")
    split_seed: int = option(0, "Seed of the train/validation/test split and of the per-example template choice.")
    limit: int | None = option(None, "Use at most this many training examples.")
    epochs: float = option(1.0, "Passes over the training split (ignored when --max-steps is set).")
    max_steps: int | None = option(None, "Optimizer steps to run (overrides --epochs).")
    batch_size: int = option(8, "Examples per micro-batch.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    lr: float | None = option(None, "Peak learning rate. Default: the method's (full 5e-5; LoRA family 1e-3; adapter, ia3, "
                                    "selective, prefix 1e-3; prompt 3e-2).")
    weight_decay: float = option(0.0, "AdamW weight decay, on matrices only (not biases, norms, IA3 vectors or DoRA magnitudes).")
    schedule: str = option("cosine", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = option(0.05, "Fraction of the steps spent warming up linearly from 0.")
    max_grad_norm: float | None = option(1.0, "Clip the gradient norm to this value (None: no clipping).")
    max_length: int = option(512, "Maximum tokens of prompt + completion (the prompt is cut from the left when longer).")
    max_target_length: int = option(128, "Maximum completion tokens (cut from the right).")
    chat_template: str = chat_template_option("Wrap prompts in the tokenizer's chat template: auto (when it has one), on, off.")
    eval_every: int = option(0, "Compute the validation loss every N steps (0: only at the end).")
    eval_limit: int | None = option(64, "Validation examples used for the validation loss (None: all).")
    save_every: int = option(0, "Save a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = option(2, "Keep the newest K checkpoints; older ones are deleted once a newer one is complete.")
    log_every: int = option(1, "Write training metrics every N steps.")
    report_to: str | None = report_to_option()
    tracking_dir: str | None = option(None, "Where MLflow keeps its local store when MLFLOW_TRACKING_URI is not set (default: --out).")
    experiment: str | None = option(None, "MLflow experiment name (default: the name of the --out or --tracking-dir folder).")
    run_name: str | None = option(None, "The run's name in the trackers (default: the name of the --out folder).")
    seed: int = option(42, "Seed of initialisation, data order and dropout.")
    # --- speed and memory (peftlab.training.packing, training.loss); the defaults are the fast path with equal losses
    batching: str = option("packed", "How a micro-batch reaches the model: packed (its examples end to end in one row, "
                                     "no padding, attention kept within each example; decoder-only models without virtual "
                                     "tokens, others fall back to padded) or padded (right-padded rows).",
                           choices=("packed", "padded"))
    group_by_length: bool = option(False, "Put examples of similar length in the same micro-batch (sorted within seeded "
                                          "mega-batches of 50 micro-batches, whose order stays random): less padding with "
                                          "--batching padded; changes which examples share a step.")
    gradient_checkpointing: bool = option(False, "Recompute each block's activations during the backward pass: much less "
                                                 "memory, about a third more compute; same results.")
    compile: bool = option(False, "torch.compile the model (the first steps compile; results equal to float tolerance).")
    autocast: str | None = option(None, "Compute in bfloat16 under autocast, weights and optimizer states in --dtype (GPUs, "
                                        "and CPUs with AVX512-BF16 or AMX only).", choices=("bfloat16",))
    dtype: str = dtype_option()
    device: str = device_option()
    # --- several processes (peftlab.training.distributed): launched by torchrun --nproc_per_node=N -m peftlab train ...
    parallel: str | None = option(None, "Under torchrun: ddp (each process holds the whole model, gradients averaged) or "
                                        "fsdp (parameters, gradients and optimizer states sharded per decoder layer, "
                                        "FSDP2). Default: ddp when torchrun started several processes. The global batch "
                                        "is --batch-size x --grad-accum x processes.", choices=("ddp", "fsdp"))
    sharded_checkpoints: bool = option(False, "With --parallel fsdp: each process writes its own shards of the weights "
                                              "and optimizer state (torch.distributed.checkpoint) instead of rank 0 "
                                              "gathering them whole, for models whose state does not fit one process "
                                              "(the checkpoints then need a file system all processes share).")
    resume: bool = option(False, "Continue the run in --out from its newest complete checkpoint (--resume PATH: from "
                                 "that checkpoint folder).")
    resume_from: str | None = option(None, "Continue the run in --out from this checkpoint folder (implies --resume).")
    skip_nonfinite_steps: bool = option(False, "Skip an optimizer step whose loss or gradient norm is NaN or infinite "
                                               "(counted in run.json) instead of stopping the run.")
    overwrite: bool = option(False, "Replace a run already in --out (the old one is kept until the new one finishes).")
    # --- LoRA family (lora, dora)
    rank: int = option(8, "LoRA rank r of the update B A.")
    alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --rslora).")
    dropout: float = option(0.05, "Dropout on the LoRA adapter's input.")
    rslora: bool = option(False, "Rank-stabilised LoRA scaling alpha / sqrt(r).")
    init: str = option("kaiming", "How LoRA's A and B start: kaiming (A Kaiming-uniform, B = 0), gaussian (A normal), "
                                  "pissa (the principal singular directions of W, which keeps the residual), "
                                  "pissa_niter_N (the same by randomized SVD with N iterations, fast) or olora (a QR "
                                  "factor of W). The saved adapter of pissa/olora applies to the original base (rank 2r).")
    loraplus_ratio: float | None = option(None, "LoRA+: B's learning rate is R times A's (--lr); the paper and peft suggest 16.")
    targets: str | None = option(None, "Modules to adapt: comma-separated names or suffixes (q_proj,v_proj), all-linear, "
                                       "or re:REGEX. Default: all-linear for the LoRA family (every linear layer but the output head); "
                                       "ia3: the architecture's k, v and feed-forward layers.")
    exclude: str | None = option(None, "Comma-separated names, suffixes or re:REGEX removed from --targets.")
    layers: str | None = option(None, "Only adapt these transformer blocks, e.g. 0-3,6 (default: all).")
    # --- QLoRA: a 4-bit NF4 base under LoRA-family adapters
    quantize: str | None = quantize_option("Store the frozen base's linear layers as 4-bit NF4 (with lora/dora; implied by qlora).")
    compute_dtype: str = option("bfloat16", "qlora / --quantize: dtype the 4-bit weights are dequantised to for compute.",
                                choices=("float32", "bfloat16"))
    # --- additive methods
    reduction_factor: int = option(16, "adapter: bottleneck width = hidden size / this factor.")
    adapter_placement: str = option("houlsby", "adapter: after attention and feed-forward (houlsby) or after feed-forward only (pfeiffer).",
                                    choices=("houlsby", "pfeiffer"))
    num_virtual_tokens: int = option(20, "prompt, prefix: virtual tokens (the course notes: 20-100).")
    prompt_init: str = option("random", "prompt: initialise the soft prompt randomly, from sampled vocabulary embeddings, or from --prompt-init-text.",
                              choices=("random", "vocab", "text"))
    prompt_init_text: str | None = option(None, "prompt: text whose token embeddings start the soft prompt, e.g. 'Summarize the following conversation'.")
    # --- selective methods
    train_modules: str | None = option(None, "selective: parameters of these modules train (names, suffixes, re:REGEX).")
    train_layers: str | None = option(None, "selective (and bitfit/layernorm): only these transformer blocks, e.g. 10-11.")
    # --- regularisation against forgetting (full fine-tuning)
    regularize: str | None = option(None, "Penalise moving away from the pre-trained weights: l2sp, or ewc (Fisher-weighted).",
                                    choices=("l2sp", "ewc"))
    reg_lambda: float = option(0.01, "Strength lambda of the --regularize penalty.")
    ewc_data: str | None = option(None, "EWC: data of the tasks to keep, to estimate the diagonal Fisher information.")
    ewc_template: str | None = option(None, "EWC: template of --ewc-data (default: detected).")
    ewc_examples: int = option(128, "EWC: examples used to estimate the Fisher information.")

    def __post_init__(self) -> None:
        validate_choices(self)
        if (self.data is None) == (not self.task):
            raise UserError("give the training data with --data PATH, or a multi-task mixture with --task NAME=PATH (repeated), not both")
        if self.prompt_init_text and self.prompt_init != "text":
            self.prompt_init = "text"  # giving the text is asking for it
        if self.resume_from:
            self.resume = True
        parse_report_to(self.report_to)  # an unknown tracker or a missing package fails now, before anything loads
        for name, value in dataclasses.asdict(self).items():  # float('nan'), 'inf', 1e309 parse as floats
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{flag(name)} must be a finite number, got {value}")
        if self.quantize and method_table.get(self.method).quantised_base == "never":
            raise UserError(f"--quantize nf4 puts LoRA-family adapters on a 4-bit base; it does not apply to --method {self.method}")
        if self.regularize and self.method != "full":
            raise UserError(f"--regularize applies to full fine-tuning; --method {self.method} already keeps the base weights frozen")
        if self.regularize == "ewc" and not self.ewc_data:
            raise UserError("--regularize ewc needs --ewc-data: data of the tasks whose performance to keep")
        _positive(self, "reg_lambda", "ewc_examples", "mix_cap", "mix_size", "mix_temperature")
        _positive(self, "batch_size", "grad_accum", "max_steps", "epochs", "max_length", "max_target_length", "limit", "eval_limit")
        _positive(self, "eval_every", "save_every", "weight_decay", allow_zero=True)
        _positive(self, "log_every", "lr", "max_grad_norm", "keep_checkpoints")
        if method_table.get(self.method).family != "reparameterisation":
            for name, default in (("init", "kaiming"), ("loraplus_ratio", None)):
                if getattr(self, name) != default:
                    raise UserError(f"--{flag(name)} applies to the LoRA family (lora, dora, qlora), not --method {self.method}")
        _positive(self, "loraplus_ratio")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other: pick one")
        if self.max_target_length >= self.max_length:
            raise UserError(f"--max-target-length ({self.max_target_length}) must be smaller than --max-length ({self.max_length})")
        # The method's own config (peft.LoraConfig ...) checks --rank, --alpha, --num-virtual-tokens ... now, before a
        # model loads. Building it needs no model, but imports torch: hence imported here, not at the top.
        from peftlab.training.methods import check_options

        check_options(self)
        if self.init not in method_table.LORA_PLAIN_INITS and (self.method == "qlora" or self.quantize):
            raise UserError(f"--init {self.init} starts from the float base weights, not a 4-bit base: use it with "
                            "--method lora without --quantize, or keep --init kaiming for QLoRA")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else method_table.get(self.method).default_lr


@dataclass
class EvalConfig:
    """``peftlab eval``: generate on a split and score with ROUGE-1/2/L/Lsum and BLEU."""

    model: str = option(REQUIRED, "Base model (or a full fine-tuning run's final/ folder).")
    data: str = option(REQUIRED, "Evaluation data (same sources as train).")
    out: str = option(REQUIRED, "Folder for predictions.jsonl and metrics.json.")
    adapter: str | None = option(None, "A PEFT adapter folder to apply to the model.")
    split: str = option("test", "Split to evaluate: train, validation, test or all.", choices=("train", "validation", "test", "all"))
    split_fractions: str = option("0.8,0.1,0.1", "Must match the training run's split to evaluate held-out data.")
    split_seed: int = option(0, "Must match the training run's --split-seed.")
    template: str | None = option(None, "Prompt template: a built-in name or a YAML file (default: detected).")
    limit: int | None = option(None, "Evaluate at most this many examples of the split.")
    fewshot: int = option(0, "In-context learning: put this many training-split examples (seeded choice) before each prompt.")
    batch_size: int = option(8, "Prompts generated together.")
    max_new_tokens: int = option(96, "Tokens generated per prompt at most (greedy).")
    max_length: int = option(512, "Maximum prompt tokens (cut from the left).")
    chat_template: str = chat_template_option()
    use_stemmer: bool = option(False, "Porter-stem tokens before ROUGE matching (as rouge-score's use_stemmer).")
    bootstrap: int = bootstrap_option()
    trust_pickle: bool = trust_pickle_option("Allow loading a pickled (.bin) adapter. Only for files you trust.")
    quantize: str | None = quantize_option("Evaluate on a 4-bit NF4 base, as a QLoRA adapter was trained.")
    dtype: str = dtype_option()
    device: str = device_option()
    overwrite: bool = option(False, "Replace predictions.jsonl/metrics.json already in --out.")

    def __post_init__(self) -> None:
        validate_choices(self)
        _positive(self, "limit", "batch_size", "max_new_tokens", "max_length")
        _positive(self, "bootstrap", "fewshot", allow_zero=True)


@dataclass
class GenerateConfig:
    """``peftlab generate``: complete prompts with greedy decoding."""

    model: str = option(REQUIRED, "Base model (or a full fine-tuning run's final/ folder).")
    adapter: str | None = option(None, "A PEFT adapter folder to apply to the model.")
    prompt: str | None = option(None, "One prompt.")
    input: str | None = option(None, "A file of prompts: text (one a line) or JSONL (strings or objects with a 'prompt' or 'text' field).")
    batch_size: int = option(8, "Prompts generated together.")
    max_new_tokens: int = option(96, "Tokens generated per prompt at most (greedy).")
    max_length: int = option(512, "Maximum prompt tokens (cut from the left).")
    chat_template: str = chat_template_option()
    trust_pickle: bool = trust_pickle_option()
    dtype: str = dtype_option()
    device: str = device_option()

    def __post_init__(self) -> None:
        validate_choices(self)
        if (self.prompt is None) == (self.input is None):
            raise UserError("give exactly one of --prompt TEXT or --input FILE")
        _positive(self, "batch_size", "max_new_tokens", "max_length")


@dataclass
class MergeConfig:
    """``peftlab merge``: fold a LoRA adapter into its base model and write a plain HF model folder."""

    model: str = option(REQUIRED, "Base model the adapter was trained on.")
    adapter: str = option(REQUIRED, "LoRA/DoRA adapter folder (peft format).")
    out: str = option(REQUIRED, "Folder for the merged model (loads with AutoModel*.from_pretrained).")
    dtype: str = dtype_option("dtype of the merged weights.")
    quantize: str | None = quantize_option("The adapter was trained on a 4-bit NF4 base (QLoRA): merge into that base's "
                                           "dequantised weights.")
    trust_pickle: bool = trust_pickle_option("Allow loading a pickled (.bin) adapter. Only for files you trust.")
    overwrite: bool = option(False, "Replace a model already in --out (the old one is kept until the new one is written).")


ADAPTER_COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")  # peft's combination_type values
SPARSIFYING_COMBINATIONS = ("ties", "dare_linear", "dare_ties")


@dataclass
class MergeAdaptersConfig:
    """``peftlab merge-adapters``: combine LoRA adapters into one new LoRA adapter, as peft's add_weighted_adapter."""

    model: str = option(REQUIRED, "Base model the adapters were trained on (only its layer names and shapes are read).")
    out: str = option(REQUIRED, "Folder for the new adapter (adapter_config.json, adapter_model.safetensors, merge.json).")
    adapter: list[str] = option([], "An adapter to combine, as NAME=DIR (one flag per adapter, in the order of --weights).")
    combination: str = option("svd", "How to combine (peft's combination_type): cat (exact, rank = sum of ranks), svd "
                                     "(rank = largest rank), linear, ties, dare_linear, dare_ties (equal ranks).",
                              choices=ADAPTER_COMBINATIONS)
    weights: str | None = option(None, "Comma-separated weight of each adapter, e.g. 0.6,0.4 (None: 1 each); a negative "
                                       "one subtracts (write --weights=-0.5,1 when the first is).")
    density: float | None = option(None, "Fraction of entries kept, in (0, 1]; needed by ties, dare_linear and dare_ties.")
    seed: int = option(42, "Seed of DARE's random masks (equal to peft's after torch.manual_seed(seed)).")
    trust_pickle: bool = trust_pickle_option("Allow loading pickled (.bin) adapters. Only for files you trust.")
    overwrite: bool = option(False, "Replace an adapter already in --out (the old one stays until the new one is written).")

    def __post_init__(self) -> None:
        validate_choices(self)
        if not self.adapter:
            raise UserError("give the adapters to combine: --adapter NAME=DIR, once for each")
        if isinstance(self.weights, (list, tuple)):  # from the Python API
            self.weights = ",".join(str(w) for w in self.weights)
        weights = self.weight_values
        if len(weights) != len(self.adapter):
            raise UserError(f"--weights gives {len(weights)} weight{'s' if len(weights) > 1 else ''} for {len(self.adapter)} "
                            "adapters: give one per --adapter, in the same order")
        if self.combination in SPARSIFYING_COMBINATIONS:
            if self.density is None:
                raise UserError(f"--combination {self.combination} needs --density, the fraction of entries kept, in "
                                "(0, 1]: e.g. --density 0.5")
            if not 0 < self.density <= 1:
                raise UserError(f"--density must be in (0, 1], got {self.density}: e.g. --density 0.5")
        elif self.density is not None:
            raise UserError(f"--density is used by ties, dare_linear and dare_ties only: drop it for "
                            f"--combination {self.combination}")

    @property
    def weight_values(self) -> list[float]:
        if self.weights is None:
            return [1.0] * len(self.adapter)
        try:
            values = [float(w) for w in self.weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {self.weights!r} is not comma-separated numbers, e.g. 0.6,0.4") from None
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"--weights {self.weights!r} must be finite numbers")
        return values


@dataclass
class ExportConfig:
    """``peftlab export``: merge an adapter into its Llama-architecture base and write one GGUF file (llama.cpp, Ollama)."""

    model: str = option(REQUIRED, "Base model (local folder, hub id, .gguf file or alias); Llama architecture.")
    out: str = option(REQUIRED, "The .gguf file to write.")
    adapter: str | None = option(None, "A LoRA/DoRA or (IA)^3 adapter folder to merge in first (others cannot merge).")
    type: str = option("f16", "Tensor type: f32, f16, or q8_0 (8-bit blocks of 32); norms stay f32.", choices=("f32", "f16", "q8_0"))
    trust_pickle: bool = trust_pickle_option("Allow loading a pickled (.bin) adapter. Only for files you trust.")
    overwrite: bool = option(False, "Replace an existing --out file (the old one stays until the new one is written).")

    def __post_init__(self) -> None:
        validate_choices(self)
        if not self.out.lower().endswith(".gguf"):
            raise UserError(f"--out {self.out} must be a .gguf file name")


@dataclass
class ScoreConfig:
    """``peftlab score``: ROUGE and BLEU of any system's outputs against references."""

    predictions: str = option(REQUIRED, "Predictions: a text file (one a line) or JSONL (strings or objects with 'text').")
    references: str = option(REQUIRED, "References, same format and order as the predictions.")
    use_stemmer: bool = option(False, "Porter-stem tokens before ROUGE matching.")
    bootstrap: int = bootstrap_option()
    json: str | None = option(None, "Also write the aggregate metrics to this JSON file.")
    per_example: str | None = option(None, "Write one JSON line of scores per example to this file.")

    def __post_init__(self) -> None:
        _positive(self, "bootstrap", allow_zero=True)


@dataclass
class ExperimentConfig:
    """What ``compare`` and ``sweep`` share: the data, the budget and the evaluation every variant gets."""

    model: str = option(REQUIRED, "Base model (local folder, hub id, .gguf file or alias).")
    data: str = option(REQUIRED, "Data (same sources as train).")
    out: str = option(REQUIRED, "Experiment folder (rerun the same command to continue an interrupted one).")
    template: str | None = option(None, "Prompt template (default: detected from the data).")
    split_fractions: str = option("0.8,0.1,0.1", "train,validation,test fractions.")
    split_seed: int = option(0, "Seed of the split.")
    train_limit: int | None = option(None, "Training examples used by every method (None: the whole train split).")
    test_limit: int | None = option(100, "Test examples evaluated by every method (None: the whole test split).")
    epochs: float = option(1.0, "Passes over the training examples (ignored when --max-steps is set).")
    max_steps: int | None = option(None, "Optimizer steps of every training method: the same token budget for all.")
    batch_size: int = option(8, "Examples per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    lr: float | None = option(None, "Peak learning rate for every method (default: each method's own).")
    train_options: str | None = option(None, "More training options for every method, e.g. rank=16,alpha=32,targets=all-linear.")
    seed: int = option(42, "Training seed.")
    max_new_tokens: int = option(96, "Tokens generated per test prompt at most.")
    max_length: int = option(512, "Maximum tokens of a training example / prompt.")
    eval_batch_size: int = option(8, "Prompts generated together.")
    latency_examples: int = option(8, "Prompts timed with the adapter unmerged and merged (0: skip).")
    report_to: str | None = report_to_option()
    dtype: str = dtype_option()
    device: str = device_option()

    def __post_init__(self) -> None:
        validate_choices(self)
        _positive(self, "train_limit", "test_limit", "epochs", "max_steps", "batch_size", "grad_accum", "lr",
                  "max_new_tokens", "max_length", "eval_batch_size")
        _positive(self, "latency_examples", allow_zero=True)
        parse_report_to(self.report_to)


@dataclass
class CompareConfig(ExperimentConfig):
    """``peftlab compare``: every method on identical splits, budget and test set, measured and reported."""

    methods: str = option("base,full,lora", "Comma-separated: base (zero-shot), fewshot:K (K examples in the prompt) and training methods.")


@dataclass
class SweepConfig(ExperimentConfig):
    """``peftlab sweep``: one method, one option over several values (e.g. --rank 1,2,4,8,16,32,64)."""

    method: str = option("lora", "The training method swept.", choices=method_table.NAMES)
    sweep: str = option(REQUIRED, "OPTION=V1,V2,... of any training option, e.g. rank=1,2,4,8 (or write --rank 1,2,4,8).", kw_only=True)


@dataclass
class ReportConfig:
    """``peftlab report``: rebuild report.md and report.html of a compare or sweep folder from its saved results."""

    run_dir: str = option(REQUIRED, "The folder of a compare or sweep run.")


@dataclass
class InspectPromptConfig:
    """``peftlab inspect-prompt``: the nearest vocabulary tokens of each virtual token of a soft prompt."""

    adapter: str = option(REQUIRED, "A prompt-tuning adapter folder (peftlab's or peft's).", positional=True)
    model: str | None = option(None, "The base model whose vocabulary to search (default: the adapter's base_model_name_or_path).")
    k: int = option(5, "Nearest tokens listed per virtual token.")

    def __post_init__(self) -> None:
        _positive(self, "k")


@dataclass
class TemplatesConfig:
    """``peftlab templates list|show|render``: the prompt template library, and a rendered example before training."""

    action: str = option(REQUIRED, "list (built-in tasks), show NAME (its YAML), render NAME (an example through each template).",
                         choices=("list", "show", "render"), positional=True)
    name: str | None = option(None, "A built-in task name or a template YAML file (show, render).", positional=True)
    record: str | None = option(None, "render: the example record as JSON, e.g. '{\"dialogue\": \"...\", \"summary\": \"...\"}'.")
    data: str | None = option(None, "render: take the record from this data source instead.")
    index: int = option(0, "render: which record of --data.")
    template: str | None = option(None, "render: only this template of the task (default: every one).")

    def __post_init__(self) -> None:
        validate_choices(self)
        if self.action in ("show", "render") and not self.name:
            raise UserError(f"peftlab templates {self.action} needs a task name or template file, e.g. dialogsum")


@dataclass
class ForgettingConfig:
    """``peftlab forgetting``: a held-out task suite before and after tuning, with per-task deltas."""

    model: str = option(REQUIRED, "The base model.")
    out: str = option(REQUIRED, "Folder for forgetting.json and forgetting.md.")
    tuned: str | None = option(None, "A fully fine-tuned model folder (a run's final/).")
    adapter: str | None = option(None, "Or a PEFT adapter folder applied to --model.")
    suite: str = option("demo", "The suite: demo (the embedded tasks) or a suite YAML file.")
    threshold: float | None = option(None, "Flag a task whose score drops by more than this (default 0.05, or the suite's).")
    batch_size: int = option(8, "Prompts per forward pass.")
    max_length: int = option(512, "Maximum prompt tokens.")
    chat_template: str = chat_template_option()
    trust_pickle: bool = trust_pickle_option()
    dtype: str = dtype_option()
    device: str = device_option()
    overwrite: bool = option(False, "Replace results already in --out.")

    def __post_init__(self) -> None:
        validate_choices(self)
        if (self.tuned is None) == (self.adapter is None):
            raise UserError("give the tuned model with --tuned DIR (full fine-tuning) or --adapter DIR (PEFT), one of them")


@dataclass
class HarnessConfig:
    """``peftlab harness``: benchmark tasks (MMLU, BBH, BIG-bench, task YAML) scored as lm-evaluation-harness does."""

    model: str = option(REQUIRED, "Base model (local folder, hub id, .gguf file or alias).")
    tasks: str = option(REQUIRED, "Comma-separated: mmlu, mmlu_<subject>, bbh, bbh_<task>, a task .yaml or a BIG-bench .json.")
    adapter: str | None = option(None, "A PEFT adapter folder to apply to the model.")
    num_fewshot: int | None = option(None, "Few-shot examples per prompt (default: each task's own).")
    limit: int | None = option(None, "Evaluate at most this many documents per task.")
    split: str | None = option(None, "Split evaluated (default: the task's, test for the built-ins; the shared MMLU copy has val).")
    data_root: str | None = option(None, "Local copies: mmlu/{dev,val,test}/<subject>_<split>.csv, bbh/<task>.json (default: the hub).")
    batch_size: int = option(8, "Requests per forward pass.")
    max_gen_toks: int | None = option(None, "Generation tasks: tokens generated at most (default: the task's).")
    apply_chat_template: bool = option(False, "Wrap each prompt in the tokenizer's chat template (instruction-tuned models), as lm-eval's --apply_chat_template.")
    backend: str = option("peftlab", "Who scores: peftlab's own harness, or lm-evaluation-harness itself through the bridge "
                          "(lm-eval's whole task registry; pip install 'peftlab[lm-eval]').", choices=("peftlab", "lm-eval"))
    out: str | None = option(None, "Folder for results.json.")
    trust_pickle: bool = trust_pickle_option()
    dtype: str = dtype_option()
    device: str = device_option()

    def __post_init__(self) -> None:
        validate_choices(self)
        _positive(self, "limit", "batch_size", "max_gen_toks")
        _positive(self, "num_fewshot", allow_zero=True)
        if self.backend != "peftlab" and type(self) is not HarnessConfig:
            raise UserError(f"--backend {self.backend} is for peftlab harness only")


@dataclass
class HolisticConfig(HarnessConfig):
    """``peftlab holistic``: HELM-style accuracy, calibration, robustness, fairness, bias, toxicity and efficiency."""

    probe_tokens: int = option(32, "Tokens generated per bias/toxicity probe prompt.")
    seed: int = option(0, "Seed of the perturbations.")


@dataclass
class DemoConfig:
    """``peftlab demo``: zero-shot baseline, LoRA and full fine-tuning compared, on the embedded model and data."""

    out: str = option("runs/demo", "Folder for the demo's runs, predictions and report.")
    model: str = option("smollm2-135m-instruct", "Base model (default: the embedded SmolLM2-135M-Instruct).")
    data: str = option("demo:dialogsum", "Data (default: the embedded generated dialogue-summarisation set).")
    methods: str = option("base,lora,full", "What to compare (see peftlab compare --methods).")
    train_examples: int = option(240, "Training examples used.")
    test_examples: int = option(30, "Held-out test examples evaluated.")
    max_steps: int = option(24, "Optimizer steps of each fine-tuning method.")
    batch_size: int = option(8, "Examples per step.")
    max_new_tokens: int = option(64, "Tokens generated per summary at most (greedy).")
    seed: int = option(42, "Seed.")
    device: str = device_option()

    def __post_init__(self) -> None:
        _positive(self, "train_examples", "test_examples", "max_steps", "batch_size", "max_new_tokens")

    def compare_config(self) -> CompareConfig:
        """The ``peftlab compare`` the demo is: its own options, with the example counts as limits and no latency timing."""
        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("train_examples", "test_examples")}
        return CompareConfig(**same, train_limit=self.train_examples, test_limit=self.test_examples, latency_examples=0)


@dataclass
class ServeConfig:
    """``peftlab serve``: an OpenAI-compatible HTTP server for a base model and its adapters, in mixed batches."""

    model: str = option(REQUIRED, "Base model: a local HF folder, a hub id, a .gguf file or an alias (decoder-only).")
    adapter: list[str] = option([], "An adapter to serve as NAME=DIR (its requests send \"model\": NAME).")
    host: str = option("127.0.0.1", "Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 every network "
                                    "(then set --api-key-env).")
    port: int = option(8000, "TCP port to listen on (0: any free port).")
    api_key_env: str | None = option(None, "Name of an environment variable holding the API key that clients must "
                                           "send as Authorization: Bearer KEY (default: no key).")
    max_adapters: int = option(8, "Adapters held in memory at most; the least recently used idle one is evicted.")
    max_lora_rank: int | None = option(None, "Largest LoRA rank the server can load (default: the largest given).")
    allow_admin: bool = option(False, "Enable POST/DELETE /v1/admin/adapters to load and unload adapters at run time.")
    adapter_root: str | None = option(None, "Folder below which admin loads may name adapter folders (relative paths only).")
    max_batch: int = option(32, "Rows decoded together at most (all adapters and the base).")
    max_queue: int = option(256, "Requests waiting at most; more are answered 429.")
    max_tokens: int = option(512, "Largest max_tokens a request may ask for.")
    max_prompt_tokens: int = option(4096, "Longest prompt a request may send, in tokens after formatting.")
    name: str | None = option(None, "The base model's name in the API (default: --model).")
    chat_template: str = chat_template_option("Format /v1/completions prompts with the chat template, as peftlab "
                                              "generate does: auto, on, off.")
    trust_pickle: bool = trust_pickle_option()
    dtype: str = dtype_option()
    device: str = device_option()

    def __post_init__(self) -> None:
        validate_choices(self)
        _positive(self, "max_adapters", "max_lora_rank", "max_batch", "max_queue", "max_tokens", "max_prompt_tokens")
        _positive(self, "port", allow_zero=True)  # 0: any free port
        if self.port > 65535:
            raise UserError(f"--port must be at most 65535, got {self.port}")
        if self.adapter_root is not None and not self.allow_admin:
            raise UserError("--adapter-root is only used with --allow-admin: add it, or drop --adapter-root")


@dataclass
class ChatConfig:
    """``peftlab chat``: talk to a model (and an adapter) in the terminal, through the serving engine."""

    model: str = option(REQUIRED, "Base model: a local HF folder, a hub id, a .gguf file or an alias (decoder-only).")
    adapter: str | None = option(None, "A PEFT adapter folder to apply.")
    system: str | None = option(None, "A system message put before the conversation.")
    max_tokens: int = option(256, "Tokens per answer at most.")
    temperature: float = option(0.0, "0: greedy; higher: more varied answers.")
    top_p: float = option(1.0, "Nucleus sampling: draw from the smallest set of tokens holding this much probability.")
    seed: int | None = option(None, "Seed of the sampling (default: random).")
    trust_pickle: bool = trust_pickle_option()
    dtype: str = dtype_option()
    device: str = device_option()

    def __post_init__(self) -> None:
        validate_choices(self)
        _positive(self, "max_tokens")
        _positive(self, "temperature", allow_zero=True)
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


# ----------------------------------------------------------------------------------------------
# Building a config from dicts (YAML, flags, overrides)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a value from YAML / the command line to the field's annotated type."""
    hints = typing.get_type_hints(cls)
    tp, optional = _unwrap_optional(hints[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"--{flag(name)} needs a value")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if typing.get_origin(tp) is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int option given 1e400 (float infinity)
        raise UserError(f"--{flag(name)} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(cls: type, values: dict[str, Any], where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise UserError(f"unknown option '{key}' in {where}{_suggest(key, names)}")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe: a mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; the value is read as YAML (numbers, booleans, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not key=value (e.g. lr=1e-4)")
        try:
            out[key.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = raw
    return out


def build(cls: type, *layers: tuple[str, dict[str, Any]]) -> Any:
    """Merge (source name, values) layers over the defaults of ``cls`` and validate the result."""
    merged: dict[str, Any] = {}
    for where, values in layers:
        check_keys(cls, values, where)
        for key, value in values.items():
            merged[key] = coerce(cls, key, value)
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in merged]
    if missing:
        raise UserError("missing required option" + ("s " if len(missing) > 1 else " ")
                        + ", ".join(f"--{flag(m)}" for m in missing))
    return cls(**merged)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
