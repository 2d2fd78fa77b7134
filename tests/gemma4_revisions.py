"""Every published Gemma 4 chat-template revision, as our own fixture templates, for tests to parametrize over.

Google has shipped four revisions (launch, mid April, end of April, July "canonical"), and from mid
April the small (E2B/E4B) and large (26B/31B) checkpoints differ. `tests/fixtures/gemma4_templates/`
holds one switch file per revision and size plus the body they share; each `Revision.template`
renders byte for byte what that published revision renders for the conversations of
`golden.json` (tests/unit/test_gemma4_revisions.py checks it).

    @pytest.mark.parametrize("rev", REVISIONS, ids=str)
    def test_something(rev):
        prompt = rev.render(messages, tools, enable_thinking=True)   # through apply_chat_template
        runtime = ChatRuntime(engine, rev.tokenizer(), chat_template=rev.template)
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_gemma_mtp.testing import TOKENIZER_DIR

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "gemma4_templates"
GOLDEN = TEMPLATES / "golden.json"

MODEL_TURN = "<|turn>model\n"
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"


@dataclass(frozen=True)
class Revision:
    """One published revision for one checkpoint size."""

    name: str  # the fixture's file stem, e.g. "july_e2b"
    release: str  # "launch", "mid_april", "end_april" or "july"
    size: str  # "e2b" (E2B/E4B) or "31b" (26B/31B)
    ollama_commit: str  # where the published copy was taken from (ollama's renderer testdata)
    thinking_off_prompt: str  # how the generation prompt after a user turn ends with thinking off
    thought_after_tools: bool  # with thinking on, the prompt after tool responses ends inside "<|channel>thought\n"
    string_arguments_raise: bool  # tool-call arguments given as a JSON string make the template raise

    def __str__(self) -> str:
        return self.name

    @property
    def template(self) -> str:
        """Our template for this revision: its switches, then the shared body."""
        return _template(self.name)

    def tokenizer(self) -> Any:
        """The tiny test tokenizer (bos `<bos>`) with this revision's template (one cached copy per revision)."""
        return _tokenizer(self.name)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text, as the runtime renders it (generation prompt on unless add_generation_prompt=False)."""
        kwargs.setdefault("add_generation_prompt", True)
        return self.tokenizer().apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def _rev(name: str, release: str, size: str, commit: str) -> Revision:
    return Revision(
        name=name,
        release=release,
        size=size,
        ollama_commit=commit,
        thinking_off_prompt=MODEL_TURN + (EMPTY_THOUGHT if size == "31b" else ""),
        thought_after_tools=release == "july",
        string_arguments_raise=release == "july",
    )


REVISIONS: tuple[Revision, ...] = (
    _rev("launch_e2b", "launch", "e2b", "96b202d34"),
    _rev("launch_31b", "launch", "31b", "96b202d34"),  # ollama's launch copy + the 26B/31B closing lines
    _rev("mid_april_e2b", "mid_april", "e2b", "bf2a42172"),
    _rev("mid_april_31b", "mid_april", "31b", "bf2a42172"),  # also ollama 40a1317df, before the split by size
    _rev("end_april_e2b", "end_april", "e2b", "c7c2837c9"),
    _rev("end_april_31b", "end_april", "31b", "c7c2837c9"),
    _rev("july_e2b", "july", "e2b", "8a0016f82"),
    _rev("july_31b", "july", "31b", "8a0016f82"),
)


def revision(name: str) -> Revision:
    """The revision named `name` (a file stem of tests/fixtures/gemma4_templates/)."""
    for rev in REVISIONS:
        if rev.name == name:
            return rev
    raise KeyError(f"no Gemma 4 template revision {name!r}; known: {[r.name for r in REVISIONS]}")


def golden_cases() -> list[dict[str, Any]]:
    """The recorded conversations: name, messages, tools, kwargs, and per revision the published
    template's render (`expected[rev]` is a string, or {"raises": message})."""
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


@functools.cache
def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8") + (TEMPLATES / "body.jinja").read_text(encoding="utf-8")


@functools.cache
def _tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = _template(name)
    return tokenizer
