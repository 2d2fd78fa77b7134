"""Train a tiny Gemma 4 chat model (and distill its MTP assistant) to reproduce fixed transcripts; cache it on disk.

The model knows its transcripts by heart and nothing else: what runs on it checks plumbing
(templates, parsing, streaming, tool loops, concurrency), never model quality. Each request is
rendered by the real ChatRuntime exactly as ChatGemmaMTP renders it, so a call that sends the
same messages and options meets the memorized completion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, Gemma4ForCausalLM, GenerationConfig

from .. import distill
from ..embedded import _default_cache_root, _transformers_bars
from ..engine import Engine
from ..engine.target import TargetModel
from ..runtime import ChatRuntime
from . import tiny
from .transcripts import Transcript

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
"""A small byte-level BPE (4096 ids) with Gemma 4's special tokens and a Gemma 4 chat template."""
MODEL_NAME = "tiny-gemma4-memorized-transcripts"
"""The checkpoint's directory name; its distilled MTP assistant lies beside it as `<name>-assistant`."""
CONTEXT = 1024
EOS = 1  # <eos>


def build_chat_target(seed: int = 0) -> Gemma4ForCausalLM:
    """An untrained tiny Gemma 4 (KV sharing, per-layer inputs) over the fixture tokenizer's vocabulary."""
    config = tiny.gemma4_text_config(shared=True, ple=True, vocab=4096)
    config.max_position_embeddings = CONTEXT
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=0, bos_token_id=2)
    return model.eval()


def training_sequences(engine: Engine, items: Sequence[Transcript]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each transcript, rendered by a ChatRuntime itself."""
    runtimes = {t.chat_template: ChatRuntime(engine, chat_template=t.chat_template) for t in items}
    tokenizer = engine.tokenizer
    return [
        (runtimes[t.chat_template].prepare(t.request()).prompt_ids, tokenizer.encode(t.completion, add_special_tokens=False)) for t in items
    ]


def _batches(sequences: list[tuple[list[int], list[int]]], size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Padded batches of similar length; labels only on completions (prompts are context, not targets)."""
    ordered = sorted(sequences, key=lambda s: len(s[0]) + len(s[1]))
    batches = []
    for start in range(0, len(ordered), size):
        group = ordered[start : start + size]
        width = max(len(p) + len(c) for p, c in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (prompt, completion) in enumerate(group):
            seq = prompt + completion
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(prompt) : len(seq)] = torch.tensor(completion)
        batches.append((ids, mask, labels))
    return batches


def memorize_completions(model: Gemma4ForCausalLM, sequences: list[tuple[list[int], list[int]]], max_epochs: int = 60) -> int:
    """Train until every completion token is the argmax under teacher forcing; return the epochs used."""
    batches = _batches(sequences)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(1, max_epochs + 1):
        model.train()
        for ids, mask, labels in batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch >= 10 and epoch % 2 == 0 and _all_memorized(model, batches):
            model.eval()
            return epoch
    model.eval()
    raise RuntimeError(f"the tiny model did not memorize its {len(sequences)} transcripts in {max_epochs} epochs")


@torch.no_grad()
def _all_memorized(model: Gemma4ForCausalLM, batches: Sequence[tuple[torch.Tensor, ...]]) -> bool:
    model.eval()
    for ids, mask, labels in batches:
        predicted = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        if not bool(((predicted == target) | (target == -100)).all()):
            return False
    return True


def _cache_key(sequences: list[tuple[list[int], list[int]]], distilled: list[bool]) -> str:
    """What the saved model depends on: the rendered token ids, which of them were distilled, the
    library versions and the code that trains it (so a changed recipe never reuses an old model)."""
    digest = hashlib.sha256(json.dumps([sequences, distilled, torch.__version__, transformers.__version__]).encode())
    for source in (Path(__file__), Path(tiny.__file__), Path(distill.__file__), TOKENIZER_DIR / "tokenizer.json"):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def memorizing_chat_model(
    transcripts: Sequence[Transcript],
    *,
    distill_on: Callable[[Transcript], bool] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The directory of a tiny Gemma 4 that memorized `transcripts`, with its MTP assistant beside it.

    Pass the path as `ChatGemmaMTP(model=...)` or `Engine.from_pretrained(...)`: the assistant is
    found as `<dir>-assistant` and drafts with MTP. `distill_on` picks the transcripts the
    assistant is distilled on (default: all); a small assistant learns a few well rather than many
    badly. The first call trains (seconds to a minute on two cores); later calls with the same
    transcripts return the cached copy under `$GEMMA_MTP_CACHE` (default
    `~/.cache/langchain-gemma-mtp`)/memorized/.
    """
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    target = build_chat_target()
    sequences = training_sequences(Engine(target, tokenizer=tokenizer, name=MODEL_NAME), transcripts)
    distilled = [distill_on is None or bool(distill_on(t)) for t in transcripts]
    root = (Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()) / "memorized"
    home = root / _cache_key(sequences, distilled)
    if (home / f"{MODEL_NAME}-assistant" / "config.json").is_file():  # the assistant is saved last
        return home / MODEL_NAME

    started, threads = time.perf_counter(), torch.get_num_threads()
    # Matrices this small train fastest on one thread, and a busy machine cannot oversubscribe it.
    torch.set_num_threads(1)
    try:
        memorize_completions(target, sequences)
        assistant = tiny.build_assistant(target, ordered=False, seed=4)
        drafted = [p + c for (p, c), keep in zip(sequences, distilled) if keep]
        distill.distill_assistant(assistant, TargetModel(target), drafted, steps=160, draft_steps=4)
    finally:
        torch.set_num_threads(threads)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        with _transformers_bars(enabled=False):
            target.save_pretrained(staging / MODEL_NAME)
            tokenizer.save_pretrained(staging / MODEL_NAME)
            assistant.save_pretrained(staging / f"{MODEL_NAME}-assistant")
        try:
            os.rename(staging, home)  # whole or not at all
        except OSError:
            if not (home / f"{MODEL_NAME}-assistant" / "config.json").is_file():
                raise  # not a concurrent build that finished first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("memorized %d transcripts in %.1fs: %s", len(sequences), time.perf_counter() - started, home)
    return home / MODEL_NAME
