"""Batched greedy generation with the KV cache.

Prompts are formatted exactly as in training (chat template or not), left-padded for
decoder-only models, and decoded until EOS or ``max_new_tokens``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from peftlab.data.encode import encode_prompts
from peftlab.progress import ProgressFactory, silent


@dataclass
class Generation:
    texts: list[str]
    new_tokens: int  # generated tokens, all prompts together (EOS included, padding excluded)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    is_seq2seq: bool,
    chat: bool,
    max_new_tokens: int = 96,
    max_length: int = 512,
    batch_size: int = 8,
    progress: ProgressFactory = silent,
) -> Generation:
    """Greedy completions of ``prompts`` (in order)."""
    model.eval()
    device = next(model.parameters()).device
    stop = _stop_ids(model, tokenizer)
    texts: list[str] = []
    new_tokens = 0
    bar = progress("generating", len(prompts), "prompt")
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[i : i + batch_size], is_seq2seq=is_seq2seq, chat=chat, max_length=max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
        )
        generated = out if is_seq2seq else out[:, batch["input_ids"].shape[1] :]  # (B, T_new)
        for row in generated.tolist():
            if is_seq2seq and row and row[0] == model.config.decoder_start_token_id:
                row = row[1:]
            ended = [j for j, t in enumerate(row) if t in stop]
            row = row[: ended[0] + 1] if ended else row
            new_tokens += len(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        bar.update(len(generated), tok_per_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    return Generation(texts, new_tokens, time.perf_counter() - start)
