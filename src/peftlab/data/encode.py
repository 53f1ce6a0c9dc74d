"""Turn rendered (prompt, completion) pairs into token ids, labels and padded batches.

Decoder-only models see ``prompt + completion`` as one sequence; the labels copy the ids of
the completion and are -100 on the prompt (and on padding), so the cross-entropy loss is taken
on completion tokens only. Encoder-decoder models (T5) get the prompt as encoder input and the
completion as labels.

For chat models (a tokenizer with a chat template, unless ``chat_template="off"``) the prompt
is wrapped as one user turn with the generation prompt appended, and the completion ends with
the end-of-turn token, exactly what the model sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.errors import UserError

IGNORE_INDEX = -100


def uses_chat_template(tokenizer, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise UserError("--chat-template on, but this tokenizer has no chat template: use --chat-template off")
    return has if mode == "auto" else mode == "on"


def format_prompt(tokenizer, text: str, chat: bool, is_seq2seq: bool) -> str:
    """The exact prompt string the model is conditioned on."""
    if is_seq2seq:
        return text
    if chat:
        return chat_text(tokenizer, [{"role": "user", "content": text}])
    return text + "\n"


def chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """A conversation in the tokenizer's chat template, the assistant's turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The ids of a conversation, encoded as peftlab encodes a chat prompt (``peftlab serve`` / ``chat``)."""
    return _prompt_ids(tokenizer, chat_text(tokenizer, messages), chat=True)


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    # A chat-formatted prompt already holds its special tokens; a plain one gets the tokenizer's (BOS).
    return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # decoder-only: same length as input_ids; seq2seq: the target ids


def encode_example(
    tokenizer,
    prompt: str,
    completion: str,
    *,
    is_seq2seq: bool,
    chat: bool,
    max_length: int,
    max_target_length: int,
) -> Encoded:
    """Token ids and labels of one training example (prompt cut from the left, target from the right)."""
    eos = tokenizer.eos_token_id
    if is_seq2seq:
        source = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        target = tokenizer(completion, add_special_tokens=False)["input_ids"][: max_target_length - 1] + [eos]
        if len(source) > max_length:  # keep the end of the input, and its closing EOS
            source = source[-max_length:]
        return Encoded(source, target)

    prompt_ids = _prompt_ids(tokenizer, format_prompt(tokenizer, prompt, chat, False), chat)
    target = tokenizer(completion, add_special_tokens=False)["input_ids"][: max_target_length - 1] + [eos]
    room = max_length - len(target)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[-room:]  # the end holds the instruction's tail and the assistant header
    return Encoded(prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target)


def collate(batch: list[Encoded], pad_id: int, is_seq2seq: bool) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` (B, T) and ``labels`` (B, T) or (B, T_target)."""

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    input_ids = pad([e.input_ids for e in batch], pad_id)
    attention_mask = pad([[1] * len(e.input_ids) for e in batch], 0)
    labels = pad([e.labels for e in batch], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(batch: list[Encoded]) -> dict[str, torch.Tensor]:
    """A decoder-only batch as one row without padding (see ``peftlab.training.packing``).

    ``input_ids``, ``labels``, ``position_ids`` (1, T) with T = sum of the examples' lengths, positions
    restarting at 0 for each example; ``cu_seq_lens`` (n + 1,) the examples' start offsets then T. The
    first label of each example is -100: the loss reads ``labels[:, 1:]``, so an example's first label
    never counts unpacked, and packed it would make the previous example's last token predict it.
    """
    ids, labels, positions, starts = [], [], [], [0]
    for e in batch:
        ids += e.input_ids
        labels += [IGNORE_INDEX] + e.labels[1:]
        positions += range(len(e.input_ids))
        starts.append(starts[-1] + len(e.input_ids))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
            "cu_seq_lens": torch.tensor(starts, dtype=torch.int32)}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a collated batch that are not padding (a packed row has none)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def prompt_ids(tokenizer, text: str, *, is_seq2seq: bool, chat: bool, max_length: int) -> list[int]:
    """The token ids a prompt is generated from: formatted as in training, its last ``max_length`` tokens."""
    formatted = format_prompt(tokenizer, text, chat, is_seq2seq)
    ids = tokenizer(formatted, add_special_tokens=True)["input_ids"] if is_seq2seq else _prompt_ids(tokenizer, formatted, chat)
    return ids[-max_length:]


def pad_prompts(rows: list[list[int]], pad_id: int, *, is_seq2seq: bool) -> dict[str, torch.Tensor]:
    """Prompt ids as one batch: left-padded for decoder-only models (every row's next token is then
    generated at the same position), right-padded for seq2seq encoders."""
    width = max(len(r) for r in rows)
    if is_seq2seq:
        ids = [r + [pad_id] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    else:
        ids = [[pad_id] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def encode_prompts(tokenizer, prompts: list[str], *, is_seq2seq: bool, chat: bool, max_length: int) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts for generation (decoder-only) or a right-padded one (seq2seq)."""
    rows = [prompt_ids(tokenizer, text, is_seq2seq=is_seq2seq, chat=chat, max_length=max_length) for text in prompts]
    return pad_prompts(rows, tokenizer.pad_token_id, is_seq2seq=is_seq2seq)
