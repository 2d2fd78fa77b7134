"""A LangChain callback handler that shows text as each burst of tokens is verified, with the burst's size.

Speculative decoding verifies several tokens per target forward pass: ChatGemmaMTP streams one chunk
per verified burst, and each chunk lists the size of the bursts verified for it
(`additional_kwargs["burst_sizes"]`: one burst, or several when text was held back). The handler
prints each burst's size after its text (superscript), then a histogram of burst sizes and the
call's speculative stats.

    python examples/agents/streaming_callbacks.py                  # Gemma 4 E2B with its MTP assistant
    python examples/agents/streaming_callbacks.py --offline-demo   # a tiny model that memorized this run
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_setup import chat_model, parser, stats_line

from langchain_gemma_mtp.testing import TURN_END, Transcript

PROMPTS = {
    "code": "Write a Python function that returns the n-th Fibonacci number, iteratively.",
    "long_form": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
SUPERSCRIPT = str.maketrans("0123456789+", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺")


class BurstPrinter(BaseCallbackHandler):
    """Prints each verified burst as it arrives, marked with its size in tokens; summarizes at the end."""

    def __init__(self, marks: bool = True) -> None:
        self.marks = marks
        self.sizes: list[int] = []
        self.marked = False  # the last thing printed was a mark

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list, **kwargs: Any) -> None:
        self.sizes = []
        self.marked = False

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        bursts = chunk.message.additional_kwargs.get("burst_sizes", []) if chunk is not None else []
        self.sizes.extend(bursts)
        mark = "+".join(map(str, bursts)).translate(SUPERSCRIPT) if self.marks and bursts else ""
        if mark and not token and self.marked:  # text held back (a partial stop string): no text between two marks
            mark = "+".translate(SUPERSCRIPT) + mark
        print(token + mark, end="", flush=True)
        if token or mark:
            self.marked = bool(mark)

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        message = response.generations[0][0].message
        counts = collections.Counter(self.sizes)
        histogram = "  ".join(f"{size}:{'#' * n}" for size, n in sorted(counts.items()))
        print(f"\n\nburst sizes (tokens per chunk: count)  {histogram}")
        print(f"{sum(self.sizes)} tokens in {len(self.sizes)} bursts (one per target forward), largest {max(self.sizes, default=0)}")
        print(f"speculative: {stats_line(message)}\n")


def offline_transcripts() -> list[Transcript]:
    """What --offline-demo's model memorizes: an answer to each prompt."""
    return [Transcript(PROMPTS["code"], OFFLINE_CODE + TURN_END), Transcript(PROMPTS["long_form"], OFFLINE_STORY + TURN_END)]


OFFLINE_CODE = (
    '```python\ndef fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number (fibonacci(0) == 0)."""\n'
    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```"
)
OFFLINE_STORY = (
    "Every morning Ada climbed the ninety steps of the lighthouse and wiped the salt from the great lens. "
    "One grey morning a green bottle lay on the rocks below, and inside it a note in careful pencil: "
    "if anyone finds this, the light you keep brought my father home. Ada read it twice, put it on the "
    "windowsill beside the lamp, and that night she kept the light burning a little brighter."
)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--draft-hint", default="auto", help="auto (picked per prompt), code, prose, tool_call, long_form or an int")
    p.add_argument("--no-marks", action="store_true", help="print the text without burst-size marks")
    args = p.parse_args(argv)
    hint = int(args.draft_hint) if args.draft_hint.isdigit() else args.draft_hint
    llm = chat_model(args, offline_transcripts, streaming=True, max_tokens=256)  # invoke streams: callbacks see bursts
    printer = BurstPrinter(marks=not args.no_marks)
    for prompt in PROMPTS.values():
        print(f"user: {prompt}\n")
        llm.invoke(prompt, config={"callbacks": [printer]}, draft_hint=hint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
