"""Shared by the agent examples: the --model / --offline-demo switch and the speculative stats line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import transformers
from langchain_core.messages import BaseMessage

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.testing import Transcript, memorizing_chat_model

DEFAULT_MODEL = "google/gemma-4-E2B-it"
OFFLINE_NOTE = (
    "--offline-demo runs a tiny Gemma 4 that memorized this example's exact transcript (its tool calls, "
    "tool results and answers), trained here in seconds and cached: it shows the plumbing (speculative "
    "decoding, streaming, tool calls, the agent loop) end to end with no download, not model quality."
)


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with --model and --offline-demo."""
    p = argparse.ArgumentParser(description=doc, epilog=OFFLINE_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"hub id or local dir of a Gemma 4 (default {DEFAULT_MODEL}; its -assistant drafts)"
    )
    p.add_argument(
        "--offline-demo",
        action="store_true",
        help="use a tiny model that memorized this example's transcript (plumbing, not quality; no download)",
    )
    return p


def chat_model(args: argparse.Namespace, transcripts: Callable[[], list[Transcript]], **kwargs: Any) -> ChatGemmaMTP:
    """ChatGemmaMTP on --model, or on the memorizing tiny model with --offline-demo; prints which."""
    if not args.offline_demo:
        print(f"model: {args.model}\n")
        return ChatGemmaMTP(model=args.model, **kwargs)
    print("OFFLINE DEMO: " + OFFLINE_NOTE.removeprefix("--offline-demo runs "))
    transformers.utils.logging.disable_progress_bar()  # the tiny model loads at once
    path = memorizing_chat_model(transcripts())
    print(f"model: {path}\n")
    return ChatGemmaMTP(model=str(path), **kwargs)


def stats_line(message: BaseMessage) -> str:
    """One model call's speculative decoding, from the stats on its message."""
    s = message.response_metadata["speculative"]
    return (
        f"drafter={s['drafter']} hint={s['draft_hint']} drafted={s['drafted']} accepted={s['accepted']} "
        f"acceptance={s['acceptance_rate']:.0%} tokens/step={s['mean_accepted_length']:.2f} "
        f"forwards={s['target_forwards']} {s['tokens_per_second']:.0f} tok/s"
    )
