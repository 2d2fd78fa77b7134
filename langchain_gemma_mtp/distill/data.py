"""Training text for distillation, offline: the user's files, or the target's own continuations of prompts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from transformers import GenerationMixin, PreTrainedModel

from ..errors import DistillError


def check_files(paths: Sequence[str | os.PathLike], what: str) -> list[Path]:
    """The paths as Paths; DistillError naming the first that is not a readable file."""
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise DistillError(f"{what} file {p!s} does not exist: pass text (.txt) or JSON lines (.jsonl) files.")
        out.append(path)
    return out


def _records(path: Path) -> list[str | dict]:
    """A .jsonl file's records ({"text": ...}, {"messages": [...]}, {"prompt": ...} or a string), else the whole text."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [text]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DistillError(f"{path}:{n} is not valid JSON ({exc.msg}): one JSON object per line.") from None
    return records


def _render(tokenizer, record: str | dict, *, prompt: bool) -> list[int]:
    """Token ids of one record: chat messages (or a prompt) through the chat template, with the
    generation prompt when it is a prompt; plain text through the tokenizer."""
    if isinstance(record, str):
        record = {"prompt": record} if prompt else {"text": record}
    if not isinstance(record, dict) or not ({"text", "messages", "prompt"} & record.keys()):
        raise DistillError(f'cannot read {str(record)[:80]!r}: use {{"text": ...}}, {{"prompt": ...}} or {{"messages": [...]}}.')
    if "text" in record:
        return list(tokenizer(record["text"])["input_ids"])
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=False))
    return list(tokenizer("\n\n".join(m.get("content") or "" for m in messages))["input_ids"])


def text_sequences(tokenizer, paths: Sequence[Path], seq_len: int, budget: int) -> list[list[int]]:
    """The files' text as token windows of at most `seq_len`, up to `budget` tokens in all."""
    out, total = [], 0
    for path in paths:
        for record in _records(path):
            ids = _render(tokenizer, record, prompt=False)
            for start in range(0, len(ids), seq_len):
                window = ids[start : start + seq_len]
                if len(window) < 8 or total >= budget:
                    continue
                out.append(window)
                total += len(window)
    return out


def prompt_list(tokenizer, paths: Sequence[Path]) -> list[list[int]]:
    """Prompts from files: one per line of a .txt (blank lines skipped), one per record of a .jsonl."""
    prompts: list[list[int]] = []
    for path in paths:
        if path.suffix == ".jsonl":
            records = _records(path)
        else:
            records = [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts.extend(_render(tokenizer, r, prompt=True) for r in records)
    return prompts


@torch.no_grad()
def generated_sequences(
    model: PreTrainedModel,
    tokenizer,
    prompts: list[list[int]],
    *,
    seq_len: int,
    budget: int,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
) -> list[tuple[list[int], int]]:
    """The target's own continuations of `prompts` (greedy, or sampled at `temperature`), as
    (prompt + continuation cut at `seq_len` tokens, prompt length); batches run together, left-padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(seed)
    out, total = [], 0
    for start in range(0, len(prompts), batch_size):
        if total >= budget:
            break
        group = [_head_and_tail(p, seq_len // 2) for p in prompts[start : start + batch_size]]
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=model.device)
        sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        gen = cast(GenerationMixin, model).generate(  # a causal LM generates; PreTrainedModel does not say so
            input_ids=ids, attention_mask=mask, max_new_tokens=seq_len - width, pad_token_id=pad, **sample
        )
        stops = set(_as_list(model.generation_config.eos_token_id))
        for p, row in zip(group, gen[:, width:].tolist()):
            cont = []
            for t in row:
                cont.append(t)
                if t in stops:
                    break
            out.append((p + cont, len(p)))
            total += len(p) + len(cont)
        if progress is not None:
            progress.update(len(group))
    return out


def _head_and_tail(prompt: list[int], limit: int) -> list[int]:
    """A prompt cut to `limit` tokens from the front, keeping its first token (BOS: Gemma drifts without it)."""
    return prompt if len(prompt) <= limit else prompt[:1] + prompt[len(prompt) - limit + 1 :]


def _as_list(x) -> list:
    return [] if x is None else [x] if isinstance(x, int) else list(x)
