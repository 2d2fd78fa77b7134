"""Grammar-constrained speculative decoding: what the grammar costs and what jump-forward pays back.

On the tool-call workloads of benchmarks/workloads.jsonl, two tasks per workload, each rendered by
the ChatRuntime exactly as a chat request would be:
  call   strict tools with the call forced (tool_choice="required"): the answer is a call
  json   response_format json_schema with the workload's first tool's parameters as the schema
Each prompt is decoded four ways with the same engine and drafter, in interleaved rounds:
  unconstrained            the same prompt ids, no grammar (today's speculative decoding)
  constrained              grammar masks, jump-forward on
  constrained, no jump     grammar masks, jump-forward off
  constrained plain        no drafter, jump-forward on (tokens per forward from the grammar alone)
Reported: tokens/s after the first burst (best of the rounds: the decoding rate the grammar
changes; the prefill it does not change is left out, since constrained answers are far shorter
than the unconstrained text and would carry more of it), tokens per target forward, jump-forward tokens accepted,
whether the answer parses and validates, and the mask cost per token (the constraint's hooks
replayed over the constrained output: llguidance's mask plus our bookkeeping, microseconds).
Then a validity check: for every distinct held-out tool schema of the workloads, forced strict
calls, sampled with several seeds, must all parse and validate (and, for contrast, how many
unconstrained answers from the same prompts do).

    python -m benchmarks.grammar_bench --model embedded --drafter hybrid --max-new 96 --rounds 3 --out benchmarks/results/grammar-270m.json
    python -m benchmarks.grammar_bench --model embedded --drafter ngram --max-new 96 --rounds 3 --out benchmarks/results/grammar-270m-ngram.json
    python -m benchmarks.grammar_bench --model embedded --validity-only --validity-max-new 96 --out benchmarks/results/grammar-validity-270m.json
    python -m benchmarks.grammar_bench --model tiny --max-new 16 --rounds 1 --limit 1 --seeds 1     # smoke run
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from typing import Any

import jsonschema
import torch

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.constraint import RequestConstraint
from langchain_gemma_mtp.engine.drafters import NoDrafter
from langchain_gemma_mtp.engine.types import SpeculativeStats
from langchain_gemma_mtp.formats.streaming import ParsedDelta
from langchain_gemma_mtp.runtime import ChatRequest, ChatRuntime, PreparedPrompt

from .common import parser, set_threads, timed_rounds, workloads, write_results


def setup(model: str, drafter: str) -> tuple[ChatRuntime, ChatRuntime, str]:
    """(runtime drafting with `drafter`, runtime of the same model without a drafter, label)."""
    if model == "embedded":
        from langchain_gemma_mtp.embedded import EMBEDDED_ASSISTANT_DIR, embedded_model_dir

        assistant = EMBEDDED_ASSISTANT_DIR if drafter in ("mtp", "hybrid") else None
        engine = Engine.from_pretrained(embedded_model_dir(), drafter=drafter, assistant=assistant, dtype="float32")
        label = "Gemma 3 270M (embedded)"
    else:
        from transformers import AutoTokenizer

        from langchain_gemma_mtp.engine.drafters import NgramDrafter
        from langchain_gemma_mtp.testing import TOKENIZER_DIR, build_chat_target

        engine = Engine(build_chat_target(seed=1), NgramDrafter(), AutoTokenizer.from_pretrained(TOKENIZER_DIR), name="tiny")
        label = "tiny random Gemma 4 (smoke only)"
    plain = Engine(engine.target, NoDrafter(), engine.tokenizer, name=engine.name, prefix_cache_mb=0)
    return ChatRuntime(engine), ChatRuntime(plain), label


def strict(tools: list[dict]) -> list[dict]:
    return [{**t, "function": {**t["function"], "strict": True}} for t in tools]


def tasks(limit: int | None, max_new: int) -> list[tuple[str, ChatRequest, dict[str, Any]]]:
    """(name, request, schemas by tool name or {"json": schema}) of every task; max_tokens is the
    run's `max_new`, which the grammar's string caps are sized from."""
    out = []
    for w in workloads():
        if w.get("kind") != "tool_call" or not w.get("tools"):
            continue
        tools = strict(w["tools"])
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        call = ChatRequest(messages=w["messages"], tools=tools, tool_choice="required", max_tokens=max_new)
        out.append((f"{w['id']}/call", call, schemas))
        schema = tools[0]["function"]["parameters"]
        answer = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        out.append((f"{w['id']}/json", ChatRequest(messages=w["messages"], response_format=answer, max_tokens=max_new), {"json": schema}))
    return out[: limit * 2] if limit else out


def parse(runtime: ChatRuntime, prepared: PreparedPrompt, token_ids: list[int]) -> ParsedDelta:
    """The answer as the runtime's parser reads it (a fresh parser, the forced opening first)."""
    parser_ = prepared.parser
    ends = runtime.stop_token_ids
    text = prepared.forced + runtime.tokenizer.decode([t for t in token_ids if t not in ends], skip_special_tokens=False)
    parsed = ParsedDelta()
    parsed.extend(parser_.feed(text))
    parsed.extend(parser_.finish())
    return parsed


def valid(runtime: ChatRuntime, request: ChatRequest, token_ids: list[int], schemas: dict[str, Any]) -> bool:
    """Whether the answer parses and matches its schema (calls: every call, at least one)."""
    parsed = parse(runtime, runtime.prepare(request), token_ids)
    try:
        if "json" in schemas:
            jsonschema.validate(json.loads(parsed.content), schemas["json"])
            return True
        if parsed.invalid_tool_calls or not parsed.tool_calls:
            return False
        for call in parsed.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    except (ValueError, KeyError, jsonschema.ValidationError):
        return False
    return True


def mask_cost_us(runtime: ChatRuntime, prepared: PreparedPrompt, token_ids: list[int]) -> float:
    """Microseconds per token of the constraint's hooks (mask one row, commit one token), replayed
    over an output: what constrained decoding adds to a plain decoding step."""
    engine = runtime.engine
    request = engine.make_request(prepared.prompt_ids, max_new_tokens=max(len(token_ids), 1), constraint=prepared.constraint)
    constraint = RequestConstraint(prepared.constraint, request.stop_token_ids, SpeculativeStats(), request.max_new_tokens)
    logits = torch.zeros(1, engine.target.vocab_size)
    start = time.perf_counter()
    for token in token_ids:
        constraint.mask(logits, [[]])
        _, finish = constraint.commit([token], None)
        if finish:
            break
    return (time.perf_counter() - start) / max(len(token_ids), 1) * 1e6


def run(runtime: ChatRuntime, prepared: PreparedPrompt, max_new: int, constraint, k: int | None):
    """A cold call, timed from after its first burst: the decoding rate, which the constraint
    changes, without the prefill, which it does not (its answers are far shorter than the
    unconstrained text, so prefill would weigh on them more)."""

    def call():
        runtime.engine.forget()
        handle = runtime.engine.submit(prepared.prompt_ids, max_new_tokens=max_new, constraint=constraint, num_draft_tokens=k)
        bursts = iter(handle)
        first = len(next(bursts).token_ids)
        start = time.perf_counter()
        for _ in bursts:
            pass
        seconds = time.perf_counter() - start
        result = handle.result()
        return (result, len(result.token_ids) - first), seconds

    return call


def bench(runtime: ChatRuntime, plain: ChatRuntime, max_new: int, rounds: int, k: int | None, limit: int | None) -> list[dict]:
    rows = []
    for name, request, schemas in tasks(limit, max_new):
        prepared = runtime.prepare(request)
        grammar = prepared.constraint
        no_jump = replace(grammar, jump_forward=False)
        ways = {
            "unconstrained": run(runtime, prepared, max_new, None, k),
            "constrained": run(runtime, prepared, max_new, grammar, k),
            "constrained, no jump": run(runtime, prepared, max_new, no_jump, k),
            "constrained plain": run(plain, prepared, max_new, grammar, None),
            "constrained plain, no jump": run(plain, prepared, max_new, no_jump, None),
        }
        measured = dict(zip(ways, timed_rounds(list(ways.values()), rounds)))
        row: dict[str, Any] = {"task": name, "prompt_tokens": len(prepared.prompt_ids)}
        for way, ((result, after_first), seconds) in measured.items():
            stats = result.stats
            row[way] = {
                "tokens": len(result.token_ids),
                "tokens_per_s": after_first / min(seconds) if after_first else 0.0,
                "tokens_per_forward": len(result.token_ids) / stats.target_forwards,
                "jump_forward_accepted": stats.jump_forward_accepted,
                "acceptance": stats.acceptance_rate,
                "valid": valid(runtime, request, result.token_ids, schemas),
                "finish": result.finish_reason,
            }
        outputs = {way: result.token_ids for way, ((result, _), _) in measured.items()}
        row["mask_us_per_token"] = mask_cost_us(runtime, prepared, outputs["constrained"])
        assert outputs["constrained"] == outputs["constrained, no jump"] == outputs["constrained plain"]
        rows.append(row)
        print(
            f"{name:24s} "
            + "  ".join(
                f"{w}: {row[w]['tokens_per_s']:6.1f} tok/s {row[w]['tokens_per_forward']:.2f} tok/fwd valid={row[w]['valid']}" for w in ways
            )
            + f"  mask {row['mask_us_per_token']:.0f} us/tok"
        )
    return rows


def validity(runtime: ChatRuntime, max_new: int, seeds: int) -> dict[str, dict[str, int]]:
    """Per distinct workload tool: forced strict calls that parse and validate, sampled over `seeds`
    seeds, and, for contrast, the same prompts decoded without the grammar."""
    seen: dict[str, tuple[dict, list[dict]]] = {}
    for w in workloads():
        for tool in w.get("tools", []):
            seen.setdefault(tool["function"]["name"], (tool, w["messages"]))
    out = {}
    for name, (tool, messages) in seen.items():
        tools = strict([tool])
        counts = {"constrained_valid": 0, "unconstrained_valid": 0, "samples": seeds}
        for seed in range(seeds):
            request = ChatRequest(messages=messages, tools=tools, tool_choice=name, temperature=0.8, seed=seed, max_tokens=max_new)
            prepared = runtime.prepare(request)
            schemas = {name: tool["function"]["parameters"]}
            for key, constraint in (("constrained_valid", prepared.constraint), ("unconstrained_valid", None)):
                result = runtime.engine.generate(
                    prepared.prompt_ids, max_new_tokens=max_new, temperature=0.8, seed=seed, constraint=constraint
                )
                counts[key] += valid(runtime, request, result.token_ids, schemas)
        out[name] = counts
        print(
            f"{name:16s} valid calls: constrained {counts['constrained_valid']}/{seeds}, unconstrained {counts['unconstrained_valid']}/{seeds}"
        )
    return out


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    ways = [w for w in rows[0] if isinstance(rows[0][w], dict)] if rows else []
    out = {}
    for way in ways:
        out[way] = {
            "tokens_per_s": statistics.mean(r[way]["tokens_per_s"] for r in rows),
            "tokens_per_forward": statistics.mean(r[way]["tokens_per_forward"] for r in rows),
            "valid": sum(r[way]["valid"] for r in rows) / len(rows),
        }
    if rows:
        out["mask_us_per_token"] = {"mean": statistics.mean(r["mask_us_per_token"] for r in rows)}
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="tiny", choices=["tiny", "embedded"])
    ap.add_argument("--drafter", default="hybrid", choices=["ngram", "mtp", "hybrid"], help="embedded: the drafter (tiny: n-gram)")
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=None, help="fixed draft length (default: the engine's adaptive one)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N workloads")
    ap.add_argument("--seeds", type=int, default=5, help="sampled calls per tool in the validity check")
    ap.add_argument("--validity-max-new", type=int, default=None, help="the validity check's token budget (default: --max-new)")
    ap.add_argument("--validity-only", action="store_true", help="run the validity check alone")
    args = ap.parse_args()
    set_threads(args.threads)
    runtime, plain, label = setup(args.model, args.drafter)
    print(f"{label}, drafter {runtime.engine.drafter.name}")
    rows = [] if args.validity_only else bench(runtime, plain, args.max_new, args.rounds, args.k, args.limit)
    checks = validity(runtime, args.validity_max_new or args.max_new, args.seeds)
    totals = summary(rows) if rows else {}
    print(json.dumps(totals, indent=1))
    write_results(args.out, args, model=label, rows=rows, summary=totals, validity=checks)


if __name__ == "__main__":
    main()
