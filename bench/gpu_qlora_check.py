"""QLoRA on a CUDA GPU: NF4 storage, logits, peak memory and step time against 16-bit LoRA.

    python bench/gpu_qlora_check.py                        # the embedded SmolLM2-135M-Instruct
    python bench/gpu_qlora_check.py --model PATH_OR_ALIAS  # anything peftlab's load_model reads (.gguf too)
    python bench/gpu_qlora_check.py --random-init          # SmolLM2-135M's shapes with random weights

Needs a CUDA GPU (exits with code 2 otherwise), torch, transformers and bitsandbytes. The base
loads in bfloat16 on the CPU and is quantised layer by layer on the GPU (compute in bfloat16).
Prints: NF4 on CUDA against the CPU reference on an awkward shape; the relative logit error of the
4-bit model against the bfloat16 one; the storage ratio of the quantised layers; peak CUDA memory
and median step time of QLoRA and 16-bit LoRA (all-linear, rank 16, batch 4 x 150 tokens, AdamW).
Takes well under 2 minutes on an H100 (mostly loading; a .gguf file is converted once first).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import peftlab  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peftlab.peft import LoraConfig, apply_lora  # noqa: E402
from peftlab.peft.nf4 import NF4Linear  # noqa: E402
from peftlab.peft.qlora import quantize_model, weight_storage  # noqa: E402

RANK, BATCH, TOKENS, WARMUP, STEPS = 16, 4, 150, 2, 5
TEXT = (
    "#Person1#: Hi Tom, are we still on for lunch tomorrow at noon?\n#Person2#: Sorry, I have to move it to "
    "Friday. Is that fine with you?\n#Person1#: Sure. Same cafe near the station?\n#Person2#: Yes, see you "
    "there at twelve. Summary: Tom and Anna move their lunch from Thursday to Friday at the cafe near the "
    "station. The customer asks about the price of a ticket to London and books two seats. She wants to "
    "return the shoes because they are too small; he offers a refund or a larger pair. "
)


def load_base(args):
    """(model in bfloat16 on the CPU, input ids (BATCH, TOKENS)): the requested model or a random SmolLM2-135M."""
    if args.random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(  # SmolLM2-135M's architecture
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        ids = torch.randint(0, config.vocab_size, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
        return model, ids
    from peftlab.models import load_model

    loaded = load_model(args.model, dtype="bfloat16")
    ids = loaded.tokenizer(TEXT * 8, return_tensors="pt").input_ids[:, :TOKENS]
    if ids.shape[1] < TOKENS:
        sys.exit(f"the tokenizer made only {ids.shape[1]} tokens of the sample text")
    return loaded.model, ids.repeat(BATCH, 1)


def train_steps(model, ids) -> tuple[list[float], list[float], int]:
    """(losses, step seconds after warm-up, peak CUDA bytes during the steps)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, seconds = [], []
    for step in range(WARMUP + STEPS):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= WARMUP:
            seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, seconds, torch.cuda.max_memory_allocated()


def check_nf4_on_cuda() -> None:
    """The CUDA kernels agree with the CPU ones on a shape whose blocks cross rows (100 inputs)."""
    weight = torch.randn(300, 100, generator=torch.Generator().manual_seed(0))
    cpu, gpu = NF4Linear(weight), NF4Linear(weight.cuda())
    same_codes = (cpu.weight_packed == gpu.weight_packed.cpu()).float().mean().item()
    diff = (cpu.dequantize() - gpu.dequantize().cpu()).abs().max().item()
    x = torch.randn(7, 100, device="cuda")
    out_err = (gpu(x) - x @ gpu.dequantize().t()).abs().max().item()
    print(f"NF4 on CUDA vs CPU (300 x 100): identical bytes {same_codes:.4%}, max |dequantised difference| "
          f"{diff:.2e}, forward vs x @ W^T {out_err:.2e}")
    if same_codes < 0.999 or diff > 1e-2 or out_err > 1e-4:
        sys.exit("FAILED: NF4 on CUDA disagrees with the CPU reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, folder or .gguf (%(default)s)")
    parser.add_argument("--random-init", action="store_true", help="SmolLM2-135M's shapes with random weights")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_qlora_check.py needs a CUDA GPU and torch sees none: run it on a GPU machine", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    check_nf4_on_cuda()

    start = time.perf_counter()
    model, ids = load_base(args)
    ids = ids.to(device)
    name = "random SmolLM2-135M" if args.random_init else args.model
    print(f"model: {name}, loaded in {time.perf_counter() - start:.1f}s; batch {tuple(ids.shape)}")
    config = LoraConfig(rank=RANK, alpha=2 * RANK, targets="all-linear")

    # 16-bit LoRA: the bfloat16 model on the GPU, adapters in float32.
    model.to(device)
    with torch.no_grad():
        reference = model(input_ids=ids[:1]).logits.float().cpu()
    weights_16 = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    lora_losses, lora_seconds, lora_peak = train_steps(apply_lora(model, config), ids)
    del model
    gc.collect()
    torch.cuda.empty_cache()

    # QLoRA: the same bfloat16 model from the CPU, quantised layer by layer on the GPU.
    model, _ = load_base(args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize_model(model, compute_dtype="bfloat16", device=device)
    torch.cuda.synchronize()
    quantize_seconds = time.perf_counter() - start
    weights_4 = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = model(input_ids=ids[:1]).logits.float().cpu()
    error = ((out - reference).norm() / reference.norm()).item()
    agree = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
    storage = weight_storage(model, reference_dtype=torch.bfloat16)
    torch.manual_seed(0)
    qlora_losses, qlora_seconds, qlora_peak = train_steps(apply_lora(model, config), ids)

    mib = 2**20
    print(f"quantised {storage.quantized.layers} linear layers on the GPU in {quantize_seconds:.2f}s")
    print(storage)
    print(f"quantised layers against float32: {storage.quantized.held / (storage.quantized.unquantized * 2):.3f}")
    print(f"NF4 (bfloat16 compute) vs bfloat16 logits: relative error {error:.4f}, top-1 agreement {agree:.3f}")
    print(f"{'':<6} {'weights MiB':>12} {'peak MiB':>9} {'median step ms':>15}  losses")
    for label, weights, peak, seconds, losses in (
        ("lora", weights_16, lora_peak, lora_seconds, lora_losses),
        ("qlora", weights_4, qlora_peak, qlora_seconds, qlora_losses),
    ):
        print(f"{label:<6} {weights / mib:>12.1f} {peak / mib:>9.1f} {1000 * statistics.median(seconds):>15.1f}  "
              + " ".join(f"{x:.3f}" for x in losses))
    print(f"qlora / lora: weights {weights_4 / weights_16:.3f}, peak memory {qlora_peak / lora_peak:.3f}, "
          f"step time {statistics.median(qlora_seconds) / statistics.median(lora_seconds):.2f}")
    if not all(torch.isfinite(torch.tensor(qlora_losses))) or qlora_losses[-1] >= qlora_losses[0]:
        sys.exit("FAILED: QLoRA training did not lower the loss")


if __name__ == "__main__":
    main()
