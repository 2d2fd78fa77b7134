"""Shared helpers of the benchmark scripts: argument set-up, timing, the workload prompts, results files.

Every script runs from the repository root as a module (`python -m benchmarks.engine_bench ...`),
so the checkout's `langchain_gemma_mtp` and `tests` import without any `sys.path` edits. Every
results file records the commit, the library versions and the machine it was measured on, and
holds no absolute path.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
WORKLOADS = BENCHMARKS / "workloads.jsonl"
TRAINING_PROMPTS = sorted((BENCHMARKS / "distill").glob("prompts-270m*.jsonl"))
LIBRARIES = ("torch", "transformers", "langchain-core", "langgraph", "httpx")


# -- arguments --------------------------------------------------------------------------------------


def parser(doc: str | None, *, threads: bool = True) -> argparse.ArgumentParser:
    """An argument parser whose help is the script's docstring, with `--out` (and `--threads`)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    if threads:
        ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return ap


def set_threads(threads: int) -> None:
    """Use `threads` torch threads for every op of this process."""
    import torch

    torch.set_num_threads(threads)


# -- timing ---------------------------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls, after one warm-up call."""
    fn()
    return statistics.median(timed(fn)[1] for _ in range(repeats))


def timed_rounds(calls: list[Callable[[], tuple[T, float]]], rounds: int) -> list[tuple[T, list[float]]]:
    """(result, seconds of every round) of each call, run in `rounds` interleaved rounds: a slow spell
    of the machine then hits every setting alike, the fastest of a call's runs is the least
    disturbed, and calls of one round, made moments apart, can be paired."""
    results: list[Any] = [None] * len(calls)
    seconds: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for i, call in enumerate(calls):
            results[i], secs = call()
            seconds[i].append(secs)
    return list(zip(results, seconds))


# -- workloads ------------------------------------------------------------------------------------


def workloads() -> list[dict[str, Any]]:
    """The workload records of `benchmarks/workloads.jsonl`, in file order."""
    return [json.loads(line) for line in WORKLOADS.read_text().splitlines() if line.strip()]


def plain_turns(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Workload messages as alternating user/assistant text turns for a template without tool roles
    (the base Gemma 3 GGUF): tool calls and results become text, tool declarations join the system text."""
    turns: list[dict] = []
    for m in messages:
        role = {"tool": "user", "system": "user"}.get(m["role"], m["role"])
        text = m.get("content") or ""
        if m.get("tool_calls"):
            text += "".join(json.dumps(c["function"]) for c in m["tool_calls"])
        if m["role"] == "tool":
            text = f"Tool result: {text}"
        if m["role"] == "system" and tools:
            text += "\nTools: " + json.dumps([t["function"] for t in tools])
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    return turns


def workload_prompts(tokenizer: Any, kinds: set[str] | None = None) -> list[tuple[str, str, list[int]]]:
    """(id, kind, prompt ids) of every chat workload (of `kinds`, if given), rendered as plain turns.
    Fails if one is among the distilled drafter's training prompts."""
    trained = {json.loads(line)["prompt"] for path in TRAINING_PROMPTS for line in path.read_text().splitlines() if line.strip()}
    out = []
    for w in workloads():
        if "messages" not in w or (kinds and w.get("kind") not in kinds):
            continue
        if {m.get("content") for m in w["messages"]} & trained:
            raise ValueError(f"workload {w['id']} is among the drafter's training prompts: benchmark on held-out prompts")
        ids = tokenizer.apply_chat_template(
            plain_turns(w["messages"], w.get("tools")), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        out.append((w["id"], w.get("kind", "?"), list(ids)))
    return out


# -- results --------------------------------------------------------------------------------------


def portable(value: Any) -> Any:
    """`value` with every path inside the repository made relative to its root, and any other
    absolute path cut to its last part: results files name no machine's directories."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, (str, Path)) and os.path.isabs(value):
        path = Path(value).resolve()
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else f".../{path.name}"
    if isinstance(value, Path):
        return str(value)
    return value


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def environment() -> dict[str, Any]:
    """The commit, library versions and machine a measurement was made with."""
    import langchain_gemma_mtp

    versions = {"python": platform.python_version(), "langchain-gemma-mtp": langchain_gemma_mtp.__version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import torch

        versions["torch"] = torch.__version__  # the imported build (e.g. "+cpu"), not only the wheel's name
        torch_threads = torch.get_num_threads()
        accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        torch_threads, accelerator = None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "versions": versions,
        "machine": {
            "system": platform.system(),
            "machine": platform.machine(),
            "cpu": _cpu_model() or platform.processor() or None,
            "cpus": os.cpu_count(),
            "torch_threads": torch_threads,
            "accelerator": accelerator,
        },
    }


def write_results(path: Path | None, args: argparse.Namespace, **data: Any) -> None:
    """Write `data` as JSON to `path` (nothing if None), with the arguments of the run and its
    `environment()`; secrets (an API key) are left out."""
    if path is None:
        return
    recorded = {k: v for k, v in vars(args).items() if k != "api_key"}
    payload = {"environment": environment(), "args": portable(recorded), **portable(data)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {portable(path.resolve())}")
