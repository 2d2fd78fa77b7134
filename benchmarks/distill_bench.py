"""The distilled MTP drafter on the embedded Gemma 3 270M: acceptance, drafter step cost and speedup per kind and k.

For each workload kind, draft length k, early-stop threshold (`MTPDrafter.stop_below`), siblings
per depth (`MTPDrafter.siblings_per_depth`: greedy draft trees) and centroid clusters scored per draft step,
in one run against plain decoding (drafter "none"): mean accepted length (tokens per target
forward), per-position acceptance, tokens/s and the speedup over plain decoding (from the fastest
runs, and paired round by round), and whether the output equals plain greedy (fp32: must; bf16:
agreement only). The drafter's own step cost is measured once per dtype as the time of one draft
step over the time of one single-token target forward (decode at a prompt-length context).
None of the workload prompts is in the drafter's training prompts (checked).

    python -m benchmarks.distill_bench --dtype bfloat16 --out benchmarks/results/distill-270m-bf16.json
    python -m benchmarks.distill_bench --dtype float32 --out benchmarks/results/distill-270m-fp32.json
    python -m benchmarks.distill_bench --dtype bfloat16 -k 4 6 8 --stop-below 0 0.2 0.3 --out ...
    python -m benchmarks.distill_bench --dtype bfloat16 -k 4 --stop-below 0.3 --siblings 0 1 2 3 --out ...
    python -m benchmarks.distill_bench --dtype bfloat16 -k 4 --stop-below 0.3 --siblings 3 --centroid-top-k 32 4 --out ...
    python -m benchmarks.distill_bench --limit 2 -k 1 4         # smoke run
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from langchain_gemma_mtp.draft_settings import MTP_SIBLING_MIN_CHANCE
from langchain_gemma_mtp.embedded import EMBEDDED_ASSISTANT_DIR, embedded_model_dir
from langchain_gemma_mtp.engine import Engine, on_short_lived_thread
from langchain_gemma_mtp.engine.drafters import DraftRequest, DraftStep, NoDrafter

from .common import median_seconds, parser, set_threads, timed_rounds, workload_prompts, write_results


@torch.inference_mode()
def step_costs(engine: Engine, ids: list[int], repeats: int = 20) -> dict[str, float]:
    """Seconds of one target decode forward (one token, logits for it) and of one draft step."""
    target, drafter = engine.target, engine.drafter
    cache = target.new_cache()
    fwd = target.forward(ids[:-1], cache, prefill=True)
    kv = target.rollback(cache, fwd, 0)
    step = DraftStep(DraftRequest(len(ids)), list(ids), 1, 1, hidden=fwd.hidden[-1:][None], shared_kv=kv)

    def target_step():
        out = target.forward([ids[-1]], cache)
        target.logits(out.hidden[-1:]).argmax(-1).item()
        cache.crop(-1)

    t = median_seconds(target_step, repeats)
    d = median_seconds(lambda: drafter.propose(step), repeats)
    return {"target_forward_s": t, "draft_step_s": d, "draft_step_over_target": d / t}


def run(engine: Engine, ids: list[int], max_new: int, k: int | None):
    """One cold call (nothing carries over from earlier calls) and its seconds."""
    engine.forget()
    start = time.perf_counter()
    result = engine.generate(ids, max_new_tokens=max_new, num_draft_tokens=k)
    return result, time.perf_counter() - start


def paired_speedup(rows: list[dict]) -> float:
    """Speedup over plain decoding of these rows together, round by round (each setting's run against
    the plain run of the same round, moments before it), median over the rounds: the machine's slow
    spells, which can last longer than a prompt, then hit both sides of a ratio alike."""
    rounds = min(len(r["secs_rounds"]) for r in rows)
    spec = [sum(r["tokens"] for r in rows) / sum(r["secs_rounds"][i] for r in rows) for i in range(rounds)]
    base = [sum(r["plain_tokens"] for r in rows) / sum(r["plain_secs_rounds"][i] for r in rows) for i in range(rounds)]
    return statistics.median(s / b for s, b in zip(spec, base))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--assistant", default=str(EMBEDDED_ASSISTANT_DIR))
    ap.add_argument("-k", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    ap.add_argument(
        "--stop-below", type=float, nargs="+", default=[0.0], help="early-stop thresholds to try at every k (0: always draft k)"
    )
    ap.add_argument(
        "--siblings", type=int, nargs="+", default=[0], help="siblings per draft depth to try at every setting (0: verify the chain alone)"
    )
    ap.add_argument(
        "--sibling-min",
        type=float,
        nargs="+",
        default=[MTP_SIBLING_MIN_CHANCE],
        help="least drafter-estimated chance for a sibling to be verified, tried at every setting",
    )
    ap.add_argument(
        "--centroid-top-k",
        type=int,
        nargs="+",
        default=[0],
        help="centroid clusters the drafter scores per step, tried at every setting (0: the drafter's own)",
    )
    ap.add_argument("--kinds", nargs="*", help="only these workload kinds (default: all)")
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=1, help="run every setting this many times, interleaved, and keep the fastest")
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    args = ap.parse_args()
    set_threads(args.threads)
    mtp = Engine.from_pretrained(embedded_model_dir(), drafter="mtp", assistant=args.assistant, dtype=args.dtype)
    plain = Engine(mtp.model, NoDrafter(), mtp.tokenizer)
    prompts = workload_prompts(mtp.tokenizer, set(args.kinds) if args.kinds else None)
    if args.limit:
        prompts = prompts[: args.limit]
    run(plain, prompts[0][2], 8, None)  # warm up kernels outside the timings
    # The least chance means nothing without siblings: one such setting, not one per value.
    embedder = mtp.drafter.assistant.masked_embedding
    own_top_k = embedder.centroid_intermediate_top_k if embedder is not None else 0
    settings = list(
        dict.fromkeys(
            (k, stop, sib, least if sib else 0.0, top or own_top_k)
            for k in args.k
            for stop in args.stop_below
            for sib in args.siblings
            for least in args.sibling_min
            for top in args.centroid_top_k
        )
    )
    for k in args.k:
        run(mtp, prompts[0][2], 8, k)
    costs = on_short_lived_thread(lambda: step_costs(mtp, prompts[0][2]))
    print(
        f"draft step {costs['draft_step_s'] * 1e3:.1f} ms, target decode forward {costs['target_forward_s'] * 1e3:.1f} ms "
        f"(ratio {costs['draft_step_over_target']:.2f})",
        flush=True,
    )
    rows = []
    for pid, kind, ids in prompts:
        calls = [lambda ids=ids: run(plain, ids, args.max_new, None)]
        for k, stop, sib, least, top in settings:

            def call(k=k, stop=stop, sib=sib, least=least, top=top, ids=ids):
                mtp.drafter.stop_below, mtp.drafter.siblings_per_depth, mtp.drafter.sibling_min_chance = stop, sib, least
                if embedder is not None:
                    embedder.centroid_intermediate_top_k = top
                return run(mtp, ids, args.max_new, k)

            calls.append(call)
        (base, base_rounds), *timed = timed_rounds(calls, args.repeats)
        base_s = min(base_rounds)
        for (k, stop, sib, least, top), (result, secs_rounds) in zip(settings, timed):
            secs = min(secs_rounds)
            speedup = (len(result.token_ids) / secs) / (len(base.token_ids) / base_s)
            rows.append(
                dict(
                    id=pid,
                    kind=kind,
                    k=k,
                    stop_below=stop,
                    siblings=sib,
                    sibling_min=least,
                    centroid_top_k=top,
                    drafted=result.stats.drafted,
                    verified=result.stats.drafted + result.stats.sibling_tokens,
                    tokens=len(result.token_ids),
                    secs=secs,
                    plain_secs=base_s,
                    secs_rounds=secs_rounds,
                    plain_secs_rounds=base_rounds,
                    plain_tokens=len(base.token_ids),
                    speedup=speedup,
                    mean_accepted_length=result.stats.mean_accepted_length,
                    per_position=result.stats.per_position_acceptance,
                    forwards=result.stats.target_forwards,
                    same=result.token_ids == base.token_ids,
                )
            )
            print(
                f"{pid} k={k} stop below {stop} siblings {sib} (min {least}) top {top}: accepted length {result.stats.mean_accepted_length:.2f}, "
                f"speedup x{speedup:.2f} (paired x{paired_speedup(rows[-1:]):.2f})"
                f"{'' if rows[-1]['same'] else ' (differs from plain)'}",
                flush=True,
            )
    print(f"\n## Distilled MTP drafter, Gemma 3 270M, {args.dtype}, {args.threads} threads, {args.max_new} new tokens\n")
    print(
        f"Drafter step: {costs['draft_step_s'] * 1e3:.1f} ms = {costs['draft_step_over_target']:.2f} x a target "
        f"decode forward ({costs['target_forward_s'] * 1e3:.1f} ms)\n"
    )
    print(summary_table(rows))
    write_results(args.out, args, step_costs=costs, rows=rows)


def summary_table(rows: list[dict]) -> str:
    """Per kind, k, stop threshold, siblings and centroid clusters: mean accepted length, draft tokens
    per target forward (chain, and all verified), speedup over plain decoding (total tokens / total
    time of the fastest runs; and paired round by round, where rounds were recorded), identity."""
    groups = defaultdict(list)
    for r in rows:
        groups[
            (r["kind"], r["k"], r.get("stop_below", 0.0), r.get("siblings", 0), r.get("sibling_min", 0.0), r.get("centroid_top_k"))
        ].append(r)
    lines = [
        (
            "| kind | k | stop below | siblings (least chance) | clusters | prompts | mean accepted length | drafted per forward "
            "| verified per forward | speedup vs plain | paired | same as plain |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, k, stop, sib, least, top), rs in sorted(groups.items(), key=lambda g: tuple(x or 0 for x in g[0])):
        spec = sum(r["tokens"] for r in rs) / sum(r["secs"] for r in rs)
        base = sum(r["plain_tokens"] for r in rs) / sum(r["plain_secs"] for r in rs)
        mal = statistics.mean(r["mean_accepted_length"] for r in rs)
        forwards = sum(r["forwards"] for r in rs)
        drafted = sum(r.get("drafted", 0) for r in rs) / forwards
        verified = sum(r.get("verified", r.get("drafted", 0)) for r in rs) / forwards
        lines.append(
            f"| {kind} | {k} | {stop:g} | {sib} ({least:g}) | {top or '-'} | {len(rs)} | {mal:.2f} | {drafted:.2f} | {verified:.2f} | {spec / base:.2f}x | "
            f"{f'{paired_speedup(rs):.2f}x' if all('secs_rounds' in r for r in rs) else '-'} | "
            f"{sum(r['same'] for r in rs)}/{len(rs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
