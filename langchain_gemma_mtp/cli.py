"""The `gemma-mtp` command line: `demo` runs a small agent team streamed beside plain decoding; `serve`
runs the OpenAI-compatible server; `distill` trains a drafter."""

from __future__ import annotations

import argparse
import os
import sys

from .engine.drafters import DRAFTER_NAMES
from .errors import GemmaMTPError


DTYPE_HELP = (
    "float32 (exact: speculative greedy equals plain greedy) or bfloat16; default $GEMMA_MTP_DTYPE, "
    "else bfloat16 on CUDA and on CPUs with native bf16, else float32"
)


STOP_HELP = (
    "MTP drafting stops a draft once the product of the drafter's own probabilities falls below this "
    "(default 0.3; 0: always draft the full length; only with the mtp or hybrid drafter)"
)


SIBLINGS_HELP = (
    "greedy requests verify up to this many runners-up per MTP draft position beside the draft, as a tree "
    "(default 3; 0: the draft alone; only with the mtp or hybrid drafter)"
)


def demo(args: argparse.Namespace) -> int:
    from .demo import demo as run

    return run(args)


def serve(args: argparse.Namespace) -> int:
    try:
        from .server import ServerSettings, load_runtime
        from .server import serve as run_server
    except ImportError as exc:
        raise SystemExit(f"the server needs its extra ({exc.name} is missing): pip install 'langchain-gemma-mtp[server]'") from exc
    name = args.served_model_name or args.model
    try:
        runtime = load_runtime(args.model, args.drafter, args.assistant, args.device, args.dtype,
                               mtp_stop_below=args.mtp_stop_below, mtp_siblings=args.mtp_siblings)
    except GemmaMTPError as exc:  # a missing or mismatched checkpoint: the message says what to do
        raise SystemExit(f"gemma-mtp serve: {exc}") from exc
    settings = ServerSettings(
        served_model_name=name,
        api_key=args.api_key or os.environ.get("GEMMA_MTP_API_KEY") or None,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
    )
    print(f"serving {name!r} ({runtime.engine.drafter.name} drafter) on http://{args.host}:{args.port}/v1", flush=True)
    run_server(runtime, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def distill(args: argparse.Namespace) -> int:
    from .distill import DistillOptions
    from .distill import distill as run

    if args.target == "embedded":
        from .embedded import embedded_model_dir

        args.target = str(embedded_model_dir())
    given = {k: v for k, v in vars(args).items() if k != "command"}
    options = DistillOptions(**{**given, "kv_layers": dict(args.kv_layers)})  # TYPE=INDEX pairs
    result = run(options)
    print(f"saved {result.out} after {result.steps} steps: held-out mean accepted length at k={options.draft_steps} "
          f"{result.mean_accepted_length:.2f}")
    return 0


def _type_index(text: str) -> tuple[str, int]:
    """TYPE=INDEX of --kv-layer."""
    layer_type, _, index = text.partition("=")
    if not index.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE=INDEX (e.g. full_attention=5)")
    return layer_type.strip(), int(index)


def _distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a Gemma 4 MTP assistant (drafter) for a target, offline")
    p.add_argument("--target", required=True, help="target model dir or hub id ('embedded': the demo's Gemma 3 270M)")
    p.add_argument("--out", required=True, help="directory for the drafter (loads as assistant=DIR) and its resumable state")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from this drafter (an earlier --out, or the assistant released for the model a target "
                        "was fine-tuned from); its shape replaces --layers/--hidden/--intermediate/--centroids")
    p.add_argument("--data", nargs="*", default=[], metavar="FILE",
                   help="text to train on: .txt, or .jsonl of {text}, {messages} (chat template) records")
    p.add_argument("--prompts", nargs="*", default=[], metavar="FILE",
                   help="prompts the target continues itself (one per line of a .txt, \\n for newlines; or .jsonl "
                        "{prompt}/{messages}): the drafter learns the target's own outputs")
    p.add_argument("--tokens", type=int, default=50_000, help="token budget of the training text")
    p.add_argument("--layers", type=int, default=None, help="assistant decoder layers, the last full attention (default 2)")
    p.add_argument("--hidden", type=int, default=None, help="assistant width (default: the target's, sharing its LM head)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 2 x hidden)")
    p.add_argument("--draft-steps", type=int, default=4, help="draft steps unrolled in training and scored held out")
    p.add_argument("--centroids", type=int, default=None,
                   help="clusters of the centroid-masked head (must divide the vocabulary; 0, the default: full-vocabulary head)")
    p.add_argument("--centroid-top-k", type=int, default=None, help="clusters scored per draft step (default 32)")
    p.add_argument("--query-weight", type=float, default=0.0,
                   help="also teach each drafter layer the target's own queries in the layer whose K/V it reads "
                        "(1 - cosine, this weight against the token loss; 0: tokens only)")
    p.add_argument("--kv-layer", dest="kv_layers", type=_type_index, action="append", default=[], metavar="TYPE=INDEX",
                   help="the target layer (0-based) whose K/V the drafter's layers of TYPE (sliding_attention or "
                        "full_attention) read, instead of the last of that type; e.g. full_attention=5, the 270M's "
                        "copying layer (benchmarks/distill/induction_layers.py finds it). Gemma 3 targets only")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (a --resume continues up to this)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per optimizer step")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts the target continues at once")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the target's dtype while generating text and teacher signals (bfloat16: about 2x faster on CPUs with bf16)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of self-generated text (0: greedy)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of sequences held out for the acceptance estimate")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out acceptance estimates")
    p.add_argument("--save-every", type=int, default=50, help="steps between resumable checkpoints")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved drafter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemma-mtp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="a small agent team (LangGraph) streamed burst by burst, beside plain transformers generate; offline by default")
    d.add_argument("--model", help="hub id or local dir (default: the embedded Gemma 3 270M from the demo extra)")
    d.add_argument("--assistant", help="drafter checkpoint (an MTP assistant or a smaller model)")
    d.add_argument("--drafter", default="auto", choices=DRAFTER_NAMES,
                   help="auto: n-gram for the embedded model; mtp or hybrid: its distilled drafter (or --assistant)")
    d.add_argument("--dtype", default=None, help=DTYPE_HELP)
    d.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the same graph on plain transformers generate (the baseline of the speedup)")
    d.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per model call (default: each node its own, 48-112; --prompt: 96)")
    d.add_argument("--prompt", default=None,
                   help="instead of the team, stream one answer to this prompt beside plain decoding in the same loop")
    d.add_argument("--draft-hint", default="auto", help="--prompt only: auto, code, prose, tool_call, long_form or an int")
    d.add_argument("--mtp-stop-below", type=float, default=None, metavar="P", help=STOP_HELP)
    d.add_argument("--mtp-siblings", type=int, default=None, metavar="N", help=SIBLINGS_HELP)
    s = sub.add_parser("serve", help="serve one model over an OpenAI-compatible HTTP API (needs the server extra)")
    s.add_argument("--model", required=True, help="hub id or local dir of the target model")
    s.add_argument("--served-model-name", help="the name clients send as `model` (default: --model as given)")
    s.add_argument("--assistant", help="drafter checkpoint (an MTP assistant or a smaller model)")
    s.add_argument("--drafter", default="auto", choices=DRAFTER_NAMES)
    s.add_argument("--dtype", default=None, help=DTYPE_HELP)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    s.add_argument("--mtp-stop-below", type=float, default=None, metavar="P", help=STOP_HELP)
    s.add_argument("--mtp-siblings", type=int, default=None, metavar="N", help=SIBLINGS_HELP)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (or set GEMMA_MTP_API_KEY)")
    s.add_argument("--max-tokens-limit", type=int, default=8192, help="cap on a request's max_tokens (and its default)")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body accepted (413 above)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    _distill_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "distill":
        return distill(args)
    if args.draft_hint.isdigit():
        args.draft_hint = int(args.draft_hint)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
