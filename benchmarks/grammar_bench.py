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

With `--memorized`, like for like: the 270M writes broken calls unconstrained, so its two runs
write different text. First the target's last decoder layers are fine-tuned in place until its
plain greedy answer to every task is the constrained answer it gave before (a model that already
writes valid calls, as a well-trained one mostly does); then both runs write the same tokens, and
their rates differ only by what the grammar costs and what jump-forward and cut drafts pay back.

    python -m benchmarks.grammar_bench --model embedded --drafter hybrid --max-new 96 --rounds 3 --out benchmarks/results/grammar-270m.json
    python -m benchmarks.grammar_bench --model embedded --drafter ngram --max-new 96 --rounds 3 --out benchmarks/results/grammar-270m-ngram.json
    python -m benchmarks.grammar_bench --model embedded --validity-only --validity-max-new 96 --out benchmarks/results/grammar-validity-270m.json
    python -m benchmarks.grammar_bench --model embedded --memorized --drafter hybrid --max-new 96 --rounds 3 --seeds 0 --out benchmarks/results/grammar-270m-memorized.json
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
from langchain_gemma_mtp.engine.worker import on_short_lived_thread
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


def written(runtime: ChatRuntime, token_ids: list[int]) -> list[int]:
    """The answer's tokens without its stop token: a grammar that completes ends the answer itself,
    where the same text decoded freely ends on the model's stop token."""
    return [t for t in token_ids if t not in runtime.stop_token_ids]


def parse(runtime: ChatRuntime, prepared: PreparedPrompt, token_ids: list[int]) -> ParsedDelta:
    """The answer as the runtime's parser reads it (a fresh parser, the forced opening first)."""
    parser_ = prepared.parser
    text = prepared.forced + runtime.tokenizer.decode(written(runtime, token_ids), skip_special_tokens=False)
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


MARGIN = 2.0  # logits by which each memorized answer token must lead the rest


class _Skip(torch.nn.Module):
    """A decoder layer that passes its input on: the frozen layers' output is computed once."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def memorize_answers(model: Any, sequences: list[tuple[list[int], list[int]]], layers: int = 4, max_epochs: int = 150) -> int:
    """Fine-tune the last `layers` decoder layers (and the final norm) of a causal LM in place until
    every answer token leads the rest by MARGIN logits under teacher forcing (so incremental decoding,
    whose sums run in another order, picks it too); return the epochs used.

    The layers below are frozen, so their output is computed once and fed in as embeddings; the
    loss reads the LM head on answer rows only (a 262k-row head over every prompt row would not fit)."""
    decoder = model.get_decoder()
    width = max(len(p) + len(a) for p, a in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, labels = [], []
    for i, (prompt, answer) in enumerate(sequences):
        seq = prompt + answer
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        rows += [(i, len(prompt) - 1 + j) for j in range(len(answer))]  # the row that predicts answer[j]
        labels += answer
    where = tuple(torch.tensor(c) for c in zip(*rows))
    target = torch.tensor(labels)
    first = len(decoder.layers) - layers
    captured: list[torch.Tensor] = []

    def capture(_module: Any, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    hook = decoder.layers[first].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    hook.remove()
    frozen = captured[0].detach()
    trained = [*decoder.layers[first:].parameters(), *decoder.norm.parameters()]
    model.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    original = decoder.layers
    decoder.layers = torch.nn.ModuleList([_Skip() for _ in range(first)] + list(original[first:]))
    optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.0)
    try:
        for epoch in range(1, max_epochs + 1):
            logits = model.lm_head(decoder(inputs_embeds=frozen, attention_mask=mask, use_cache=False).last_hidden_state[where])
            right = logits.gather(1, target[:, None]).squeeze(1)
            if bool((right - logits.scatter(1, target[:, None], float("-inf")).amax(-1) >= MARGIN).all()):
                return epoch
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        raise RuntimeError(f"the answers were not memorized in {max_epochs} epochs (loss {loss.item():.3f})")
    finally:
        decoder.layers = original
        model.requires_grad_(False)
        model.eval()


def memorized_runtime(runtime: ChatRuntime, plain: ChatRuntime, max_new: int, limit: int | None) -> dict[str, bool]:
    """Fine-tune the target until its plain greedy answer to every task is its constrained one; per
    task, whether plain decoding now writes exactly that answer (only those compare like for like)."""
    items = [(name, runtime.prepare(request)) for name, request, _ in tasks(limit, max_new)]
    answers = [plain.engine.generate(p.prompt_ids, max_new_tokens=max_new, constraint=p.constraint).token_ids for _, p in items]
    # A completed grammar ends the answer without a stop token; written freely, the same answer must end on one.
    stop = runtime.tokenizer.eos_token_id if runtime.tokenizer.eos_token_id in runtime.stop_token_ids else min(runtime.stop_token_ids)
    answers = [a if a and a[-1] in runtime.stop_token_ids else [*a, stop] for a in answers]
    model = runtime.engine.target.model
    epochs = on_short_lived_thread(lambda: memorize_answers(model, [(p.prompt_ids, a) for (_, p), a in zip(items, answers)]))
    runtime.engine.forget()
    same = {
        name: written(runtime, plain.engine.generate(p.prompt_ids, max_new_tokens=max_new).token_ids) == written(runtime, a)
        for (name, p), a in zip(items, answers)
    }
    print(
        f"memorized in {epochs} epochs; plain greedy writes the constrained answer on {sum(same.values())} of {len(same)} tasks", flush=True
    )
    return same


def bench(
    runtime: ChatRuntime, plain: ChatRuntime, max_new: int, rounds: int, k: int | None, limit: int | None, same: dict[str, bool] | None
) -> list[dict]:
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
        if same is not None:
            texts = [written(runtime, measured[way][0][0].token_ids) for way in ("unconstrained", "constrained")]
            row["same_text"] = same[name] and texts[0] == texts[1]
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
    alike = [r["constrained"]["tokens_per_s"] / r["unconstrained"]["tokens_per_s"] for r in rows if r.get("same_text")]
    if alike:  # --memorized: the tasks where both runs wrote the same tokens
        out["same_text constrained / unconstrained"] = {"tasks": len(alike), "min": min(alike), "mean": statistics.mean(alike)}
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
    ap.add_argument("--memorized", action="store_true", help="first fine-tune the target to write its constrained answers unconstrained")
    args = ap.parse_args()
    if args.memorized and args.model != "embedded":
        ap.error("--memorized fine-tunes the 270M: use it with --model embedded")
    set_threads(args.threads)
    runtime, plain, label = setup(args.model, args.drafter)
    print(f"{label}, drafter {runtime.engine.drafter.name}")
    same = memorized_runtime(runtime, plain, args.max_new, args.limit) if args.memorized else None
    rows = [] if args.validity_only else bench(runtime, plain, args.max_new, args.rounds, args.k, args.limit, same)
    checks = validity(runtime, args.validity_max_new or args.max_new, args.seeds) if args.seeds else {}
    totals = summary(rows) if rows else {}
    print(json.dumps(totals, indent=1))
    write_results(args.out, args, model=label, rows=rows, summary=totals, validity=checks)


if __name__ == "__main__":
    main()
