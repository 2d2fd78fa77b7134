"""The `gemma-mtp` command line: `demo` runs a small agent team streamed beside plain decoding; `serve`
runs the OpenAI-compatible server; `distill` trains a drafter."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .draft_settings import (
    DEFAULT_MTP_SIBLINGS,
    DEFAULT_MTP_STOP_BELOW,
    DRAFT_HINT_NAMES,
    DRAFTER_NAMES,
    MAX_DRAFT_TOKENS,
    MTP_DRAFTERS,
)
from .errors import GemmaMTPError

DTYPE_HELP = (
    "float32 (exact: speculative greedy equals plain greedy) or bfloat16; default $GEMMA_MTP_DTYPE, "
    "else bfloat16 on CUDA and on CPUs with native bf16, else float32"
)


STOP_HELP = (
    "MTP drafting stops a draft once the product of the drafter's own probabilities falls below this "
    f"(default: chosen per step from measured costs, {DEFAULT_MTP_STOP_BELOW} until measured; 0: always draft the full length; only with the {' or '.join(MTP_DRAFTERS)} drafter)"
)


SIBLINGS_HELP = (
    "greedy requests verify up to this many runners-up per MTP draft position beside the draft, as a tree "
    f"(default: chosen per step from measured costs, {DEFAULT_MTP_SIBLINGS} until measured; 0: the draft alone; only with the {' or '.join(MTP_DRAFTERS)} drafter)"
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
        template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    except OSError as exc:
        raise SystemExit(f"gemma-mtp serve: cannot read --chat-template {args.chat_template}: {exc.strerror}") from exc
    try:
        runtime = load_runtime(
            args.model,
            args.drafter,
            args.assistant,
            args.device,
            args.dtype,
            mtp_stop_below=args.mtp_stop_below,
            mtp_siblings=args.mtp_siblings,
            prefix_cache_mb=args.prefix_cache_mb,
            chat_template=template,
            kv_cache_mb=args.kv_cache_mb,
        )
    except GemmaMTPError as exc:  # a missing or mismatched checkpoint: the message says what to do
        raise SystemExit(f"gemma-mtp serve: {exc}") from exc
    settings = ServerSettings(
        served_model_name=name,
        api_key=args.api_key or os.environ.get("GEMMA_MTP_API_KEY") or None,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        max_concurrent=args.max_concurrent,
        max_queued=args.max_queued,
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
    given = {k: v for k, v in vars(args).items() if k not in ("command", "log_level")}
    options = DistillOptions(**{**given, "kv_layers": dict(args.kv_layers)})  # TYPE=INDEX pairs
    result = run(options)
    print(
        f"saved {result.out} after {result.steps} steps: held-out mean accepted length at k={options.draft_steps} "
        f"{result.mean_accepted_length:.2f}"
    )
    return 0


def _type_index(text: str) -> tuple[str, int]:
    """TYPE=INDEX of --kv-layer."""
    layer_type, _, index = text.partition("=")
    if not index.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE=INDEX (e.g. full_attention=5)")
    return layer_type.strip(), int(index)


def _at_least(minimum: int):
    """An argparse type: an int >= minimum."""

    def parse(text: str) -> int:
        if not text.strip().lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int >= {minimum}")
        return int(text)

    return parse


def _positive_mb(text: str) -> float:
    """An argparse type: a size in MB > 0, checked before a model loads."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MB > 0")
    return value


def _distill_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("distill", parents=[common], help="train a Gemma 4 MTP assistant (drafter) for a target, offline")
    p.add_argument("--target", required=True, help="target model dir or hub id ('embedded': the demo's Gemma 3 270M)")
    p.add_argument("--out", required=True, help="directory for the drafter (loads as assistant=DIR) and its resumable state")
    p.add_argument(
        "--init",
        default=None,
        metavar="DIR",
        help="start from this drafter (an earlier --out, or the assistant released for the model a target "
        "was fine-tuned from); its shape replaces --layers/--hidden/--intermediate/--centroids",
    )
    p.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="FILE",
        help="text to train on: .txt, or .jsonl of {text}, {messages} (chat template) records",
    )
    p.add_argument(
        "--prompts",
        nargs="*",
        default=[],
        metavar="FILE",
        help="prompts the target continues itself (one per line of a .txt, \\n for newlines; or .jsonl "
        "{prompt}/{messages}): the drafter learns the target's own outputs",
    )
    p.add_argument("--tokens", type=int, default=50_000, help="token budget of the training text")
    p.add_argument("--layers", type=int, default=None, help="assistant decoder layers, the last full attention (default 2)")
    p.add_argument("--hidden", type=int, default=None, help="assistant width (default: the target's, sharing its LM head)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 2 x hidden)")
    p.add_argument("--draft-steps", type=int, default=4, help="draft steps unrolled in training and scored held out")
    p.add_argument(
        "--centroids",
        type=int,
        default=None,
        help="clusters of the centroid-masked head (must divide the vocabulary; 0, the default: full-vocabulary head)",
    )
    p.add_argument("--centroid-top-k", type=int, default=None, help="clusters scored per draft step (default 32)")
    p.add_argument(
        "--query-weight",
        type=float,
        default=0.0,
        help="also teach each drafter layer the target's own queries in the layer whose K/V it reads "
        "(1 - cosine, this weight against the token loss; 0: tokens only)",
    )
    p.add_argument(
        "--kv-layer",
        dest="kv_layers",
        type=_type_index,
        action="append",
        default=[],
        metavar="TYPE=INDEX",
        help="the target layer (0-based) whose K/V the drafter's layers of TYPE (sliding_attention or "
        "full_attention) read, instead of the last of that type; e.g. full_attention=5, the 270M's "
        "copying layer (benchmarks/distill/induction_layers.py finds it). Gemma 3 targets only",
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (a --resume continues up to this)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per optimizer step")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts the target continues at once")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the target's dtype while generating text and teacher signals (bfloat16: about 2x faster on CPUs with bf16)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of self-generated text (0: greedy)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of sequences held out for the acceptance estimate")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out acceptance estimates")
    p.add_argument("--save-every", type=int, default=50, help="steps between resumable checkpoints")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved drafter")
    p.add_argument("--seed", type=int, default=0, help="seeds the held-out split, initialization and sampling")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _configure_logging(level: str) -> None:
    """Our loggers (engine loading, the server) print at `level`; other libraries stay at warning."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger(__package__ or "langchain_gemma_mtp").setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    """The `gemma-mtp` parser; building it imports nothing heavy, so --help and --version answer at once."""
    parser = argparse.ArgumentParser(prog="gemma-mtp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level of this package's loggers (e.g. the 'loaded ...' line) and, under serve, uvicorn's",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        parents=[common],
        help="a small agent team (LangGraph) streamed burst by burst, beside plain transformers generate; offline by default",
    )
    d.add_argument("--model", help="hub id or local dir (default: the embedded Gemma 3 270M from the demo extra)")
    d.add_argument("--assistant", help="drafter checkpoint (an MTP assistant or a smaller model)")
    d.add_argument(
        "--drafter",
        default="auto",
        choices=DRAFTER_NAMES,
        help="auto: n-gram for the embedded model; mtp or hybrid: its distilled drafter (or --assistant)",
    )
    d.add_argument("--dtype", default=None, help=DTYPE_HELP)
    d.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the same graph on plain transformers generate (the baseline of the speedup)",
    )
    d.add_argument(
        "--max-tokens", type=int, default=None, help="new tokens per model call (default: each node its own, 48-112; --prompt: 96)"
    )
    d.add_argument(
        "--prompt", default=None, help="instead of the team, stream one answer to this prompt beside plain decoding in the same loop"
    )
    d.add_argument("--draft-hint", default="auto", help=f"--prompt only: {', '.join(DRAFT_HINT_NAMES)} or an int 0..{MAX_DRAFT_TOKENS}")
    d.add_argument("--mtp-stop-below", type=float, default=None, metavar="P", help=STOP_HELP)
    d.add_argument("--mtp-siblings", type=int, default=None, metavar="N", help=SIBLINGS_HELP)
    s = sub.add_parser("serve", parents=[common], help="serve one model over an OpenAI-compatible HTTP API (needs the server extra)")
    s.add_argument("--model", required=True, help="hub id or local dir of the target model")
    s.add_argument("--served-model-name", help="the name clients send as `model` (default: --model as given)")
    s.add_argument("--assistant", help="drafter checkpoint (an MTP assistant or a smaller model)")
    s.add_argument(
        "--drafter",
        default="auto",
        choices=DRAFTER_NAMES,
        help="auto: hybrid when an MTP assistant is given or found as MODEL-assistant, else n-gram",
    )
    s.add_argument("--dtype", default=None, help=DTYPE_HELP)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    s.add_argument("--mtp-stop-below", type=float, default=None, metavar="P", help=STOP_HELP)
    s.add_argument("--mtp-siblings", type=int, default=None, metavar="N", help=SIBLINGS_HELP)
    s.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template file to use instead of the tokenizer's own")
    s.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=None,
        metavar="MB",
        help="memory for the KV caches of recent prompts, reused by requests that resend them (default 1024; 0: off)",
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (or set GEMMA_MTP_API_KEY)")
    s.add_argument("--max-tokens-limit", type=int, default=8192, help="cap on a request's max_tokens (and its default)")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body accepted (413 above)")
    s.add_argument("--max-concurrent", type=_at_least(1), default=16, help="requests generating at once (default 16)")
    s.add_argument(
        "--max-queued",
        type=_at_least(0),
        default=64,
        help="requests waiting for a slot; one more is answered 429 with Retry-After (default 64)",
    )
    s.add_argument(
        "--kv-cache-mb",
        type=_positive_mb,
        default=None,
        metavar="MB",
        help="KV cache that running requests may hold together; a request that could never fit is a 400, "
        "one that does not fit now waits (default: half the memory free after loading, less the prefix cache)",
    )
    _distill_parser(sub, common)
    return parser


# libgomp's spin count for the CLI's processes (serve, demo, distill), read once when torch loads.
# The default 300,000 turns keeps an idle machine's threads hot but collapses beside another busy
# process on the same cores; 10,000 measured 6% slower idle and 1.1-5x faster beside a busy torch
# process (benchmarks/spin_bench.py, docs/benchmarks.md). A value the user set is kept.
SPIN_COUNT = "10000"


def _set_spin_count() -> None:
    if "torch" not in sys.modules:  # once torch has loaded, libgomp has read its own
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def main(argv: list[str] | None = None) -> int:
    _set_spin_count()
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    if args.command == "serve":
        return serve(args)
    if args.command == "distill":
        return distill(args)
    if args.draft_hint.isdigit():
        args.draft_hint = int(args.draft_hint)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
