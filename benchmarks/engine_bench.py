"""Engine speed against transformers `generate` in the same run: greedy, prompt lookup, assisted (MTP).

Pairs, each at the same draft length k:
  ours none   vs HF greedy                         (our loop's overhead)
  ours ngram  vs HF generate(prompt_lookup_num_tokens=k)
  ours mtp    vs HF generate(assistant_model=..., num_assistant_tokens=k)   (when an assistant exists)
Every row reports tokens/s, the ratio to HF greedy, acceptance, target forwards, and whether the
output equals HF greedy's (fp32: must; bf16: agreement only).

    python -m benchmarks.engine_bench --model embedded --dtype bfloat16 --mtp --max-new 48 --repeats 3 --out benchmarks/results/engine-270m-bf16.json
    python -m benchmarks.engine_bench --model embedded --dtype float32 --max-new 48 --out benchmarks/results/engine-270m-fp32.json
    python -m benchmarks.engine_bench --model tiny --out benchmarks/results/engine-tiny-fp32.json
    python -m benchmarks.engine_bench --model tiny --max-new 8 --limit 1     # smoke run
"""

from __future__ import annotations

import statistics

import torch

from langchain_gemma_mtp.engine import Engine, on_short_lived_thread
from langchain_gemma_mtp.engine.drafters import HybridDrafter, MTPDrafter, NgramDrafter, NoDrafter
from langchain_gemma_mtp.engine.target import TargetModel

from .common import parser, set_threads, timed, workload_prompts, write_results


def count_forwards(model):
    calls = [0]
    model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def hf_run(model, ids, max_new, calls, **kw):
    before = calls[0]

    def run():
        with torch.inference_mode():
            return timed(lambda: model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, **kw))

    out, secs = on_short_lived_thread(run)
    return out[0, len(ids) :].tolist(), secs, calls[0] - before


# The draft hint each workload kind would get from an agent step.
KIND_HINT = {"code": "code", "copy_edit": "code", "prose": "prose", "long_form": "long_form", "rag": "prose", "tool_call": "tool_call"}


def ours_run(engine, ids, max_new, k, hint=None):
    engine.forget()  # a single cold call, like HF's: no prefix cache, no n-gram index from earlier runs
    result, secs = timed(lambda: engine.generate(ids, max_new_tokens=max_new, num_draft_tokens=k, draft_hint=hint))
    return result.token_ids, secs, result.stats


def bench_prompt(model, engines, assistant, ids, kind, max_new, k, calls, repeats):
    """All methods on one prompt; the best of `repeats` timings per method."""
    rows = {}

    def best(fn):
        runs = [fn() for _ in range(repeats)]
        return min(runs, key=lambda r: r[1])

    ref, secs, fw = best(lambda: hf_run(model, ids, max_new, calls))
    rows["hf greedy"] = dict(tokens=len(ref), secs=secs, forwards=fw, acceptance=None, same=True)
    toks, secs, fw = best(lambda: hf_run(model, ids, max_new, calls, prompt_lookup_num_tokens=k))
    rows[f"hf prompt lookup k={k}"] = dict(tokens=len(toks), secs=secs, forwards=fw, acceptance=None, same=toks == ref)
    if assistant is not None and model.config.model_type.startswith("gemma4"):  # HF refuses other pairings
        assistant.generation_config.num_assistant_tokens = k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        toks, secs, fw = best(lambda: hf_run(model, ids, max_new, calls, assistant_model=assistant))
        rows[f"hf assisted mtp k={k}"] = dict(tokens=len(toks), secs=secs, forwards=fw, acceptance=None, same=toks == ref)
    for name, engine in engines.items():
        toks, secs, stats = best(lambda: ours_run(engine, ids, max_new, None if name == "none" else k))
        label = f"ours {name}" + ("" if name == "none" else f" k={k}")
        rows[label] = dict(
            tokens=len(toks),
            secs=secs,
            forwards=stats.target_forwards,
            acceptance=stats.acceptance_rate if name != "none" else None,
            same=toks == ref,
        )
        if name != "none":  # the per-call hint with its adaptive length, as an agent node would run it
            hint = KIND_HINT.get(kind, "auto")
            toks, secs, stats = best(lambda: ours_run(engine, ids, max_new, None, hint))
            rows[f"ours {name} hint"] = dict(
                tokens=len(toks), secs=secs, forwards=stats.target_forwards, acceptance=stats.acceptance_rate, same=toks == ref
            )
    return rows


def embedded_setup(dtype, with_drafter: bool):
    """The embedded Gemma 3 270M, with the drafter distilled for it when asked."""
    from langchain_gemma_mtp.embedded import EMBEDDED_ASSISTANT_DIR, embedded_model_dir

    if with_drafter:
        base = Engine.from_pretrained(embedded_model_dir(), drafter="mtp", assistant=EMBEDDED_ASSISTANT_DIR, dtype=dtype)
    else:
        base = Engine.from_pretrained(embedded_model_dir(), drafter="none", dtype=dtype)
    prompts = workload_prompts(base.tokenizer)
    assistant = base.drafter.assistant if with_drafter else None
    return base.model, assistant, prompts, "Gemma 3 270M (embedded)"


def tiny_setup(dtype):
    """A tiny random Gemma 4 target and an assistant distilled on its own greedy text for a few seconds."""
    from langchain_gemma_mtp.distill import distill_assistant
    from tests.tiny_models import VOCAB, build_assistant, build_target

    target = build_target("shared_ple", seed=0).to(dtype)
    assistant = build_assistant(target, ordered=True, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, VOCAB, (40,), generator=g).tolist() for _ in range(8)]
    with torch.inference_mode():
        texts = [p + target.generate(torch.tensor([p]), do_sample=False, max_new_tokens=64)[0, len(p) :].tolist() for p in prompts]
    distill_assistant(assistant, TargetModel(target), texts[:6], steps=150, draft_steps=4)
    assistant = assistant.to(dtype)
    return target, assistant, [(f"tiny-{i}", "held-out" if i >= 6 else "seen", p) for i, p in enumerate(prompts)], "tiny Gemma 4 pair"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="tiny", choices=["tiny", "embedded"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    ap.add_argument("--mtp", action="store_true", help="embedded: add the distilled drafter (mtp and hybrid rows)")
    args = ap.parse_args()
    set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, assistant, prompts, title = (
        on_short_lived_thread(lambda: tiny_setup(dtype)) if args.model == "tiny" else embedded_setup(dtype, args.mtp)
    )
    if args.limit:
        prompts = prompts[: args.limit]
    calls = count_forwards(model)
    engines = {"none": Engine(model, NoDrafter()), "ngram": Engine(model, NgramDrafter())}
    if assistant is not None:
        mtp = MTPDrafter(assistant, TargetModel(model))
        engines["mtp"] = Engine(model, mtp)
        engines["hybrid"] = Engine(model, HybridDrafter(mtp, NgramDrafter()))
    # Warm every method up on the first prompt (kernel selection for new shapes happens once per
    # process and would otherwise be charged to whichever method runs first).
    bench_prompt(model, engines, assistant, prompts[0][2], prompts[0][1], 8, args.k, calls, 1)
    results = []
    for pid, kind, ids in prompts:
        rows = bench_prompt(model, engines, assistant, ids, kind, args.max_new, args.k, calls, args.repeats)
        base = rows["hf greedy"]
        for method, r in rows.items():
            r.update(
                id=pid,
                kind=kind,
                method=method,
                tok_s=r["tokens"] / r["secs"],
                vs_hf_greedy=(r["tokens"] / r["secs"]) / (base["tokens"] / base["secs"]),
            )
            results.append(r)
        print(
            pid,
            kind,
            "  ".join(f"{m}: {r['tok_s']:.1f} tok/s x{r['vs_hf_greedy']:.2f}{'' if r['same'] else ' (differs)'}" for m, r in rows.items()),
            flush=True,
        )
    print(f"\n## {title}, {args.dtype}, {args.threads} threads, {args.max_new} new tokens, k={args.k}\n")
    print(summary_table(results))
    write_results(args.out, args, title=title, rows=results)


def summary_table(results: list[dict]) -> str:
    """Markdown: per kind and method, total tokens / total seconds, and the geometric-free ratio of sums."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    lines = ["| kind | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for kind in kinds + ["all"]:
        cells = []
        base = [r for r in results if r["method"] == "hf greedy" and kind in (r["kind"], "all")]
        base_tps = sum(r["tokens"] for r in base) / sum(r["secs"] for r in base)
        for m in methods:
            rs = [r for r in results if r["method"] == m and kind in (r["kind"], "all")]
            tps = sum(r["tokens"] for r in rs) / sum(r["secs"] for r in rs)
            acc = [r["acceptance"] for r in rs if r["acceptance"] is not None]
            same = sum(r["same"] for r in rs)
            cell = f"{tps:.1f} tok/s x{tps / base_tps:.2f}"
            if acc:
                cell += f", acc {statistics.mean(acc):.0%}"
            if same != len(rs):
                cell += f", same {same}/{len(rs)}"
            cells.append(cell)
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
