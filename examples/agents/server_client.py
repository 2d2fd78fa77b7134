"""The ReAct agent of react_agent.py, against `gemma-mtp serve` through `base_url`: the model runs in
another process (which many agent processes can share), and ChatGemmaMTP talks to it over HTTP
with the same streaming, tool calls, draft hints and speculative stats as in-process.

    python examples/agents/server_client.py --base-url http://127.0.0.1:8000/v1 --model google/gemma-4-E2B-it
    python examples/agents/server_client.py                  # starts `gemma-mtp serve --model ...` itself
    python examples/agents/server_client.py --offline-demo   # ... on a tiny model that memorized this run

The same `base_url` works with vLLM (`vllm serve ... --speculative-config ...`, see docs/server.md);
there the draft hint is ignored, since vLLM has no per-request draft length.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_setup import OFFLINE_NOTE, parser
from react_agent import QUESTION, offline_transcripts, run

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.server import LocalServer, serve_in_subprocess

SPEC_METRICS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")


def server_for(args) -> tuple[str, contextlib.AbstractContextManager[LocalServer | None]]:
    """(served model name, a context giving the server): the one at --base-url, or a child process."""
    if args.base_url:
        return args.model, contextlib.nullcontext(None)
    model = args.model
    if args.offline_demo:
        from langchain_gemma_mtp.testing import memorizing_chat_model

        print("OFFLINE DEMO: " + OFFLINE_NOTE.removeprefix("--offline-demo runs "))
        model = str(memorizing_chat_model(offline_transcripts()))
    print(f"starting: gemma-mtp serve --model {model}")
    return model, serve_in_subprocess(["--model", model, "--log-level", "warning"])


def spec_counters(metrics_url: str) -> dict[str, float]:
    """The server's speculative decoding counters (Prometheus text, vLLM's names)."""
    counters = {}
    for line in httpx.get(metrics_url).text.splitlines():
        name, _, value = line.partition(" ")
        short = name.split(":")[-1].removesuffix("_total")
        if short in SPEC_METRICS:
            counters[short] = float(value)
    return counters


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--base-url", help="a running OpenAI-compatible server (default: start `gemma-mtp serve`)")
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    model, serving = server_for(args)
    with serving as server:
        base_url = args.base_url or server.base_url
        print(f"server: {base_url}  model: {model}\n")
        llm = ChatGemmaMTP(base_url=base_url, model=model, api_key=args.api_key)
        messages = run(llm, QUESTION)
        metrics_url = base_url.removesuffix("/v1") + "/metrics"
        with contextlib.suppress(httpx.HTTPError):  # vLLM and others may name or place them differently
            counters = spec_counters(metrics_url)
            print("\nserver metrics: " + ", ".join(f"{k}={v:.0f}" for k, v in counters.items()))
    return 0 if messages and not messages[-1].tool_calls else 1


if __name__ == "__main__":
    sys.exit(main())
