"""Our Gemma 3 chat template: the exact strings of Gemma 3's turn format, and the turns it refuses.

The expected strings are what the official Gemma 3 template (google/gemma-3-*-it) renders for the
same messages; they were checked against it before this template replaced the copy we carried.
"""

from __future__ import annotations

import functools
import re

import pytest
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerFast

from langchain_gemma_mtp.chat_templates import GEMMA3_CHAT_TEMPLATE
from langchain_gemma_mtp.testing import TOKENIZER_DIR

ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def render(messages: list[dict], generation_prompt: bool = True) -> str:
    return tokenizer().apply_chat_template(
        messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=generation_prompt
    )


def test_system_text_opens_the_first_user_turn_and_assistant_is_model() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_without_system_or_generation_prompt() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert render(messages, generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    )
    assert render([{"role": "user", "content": "Hi"}]) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_turn_text_is_trimmed_and_system_text_kept_as_given() -> None:
    messages = [
        {"role": "system", "content": "  Rules:\n- short "},
        {"role": "user", "content": [{"type": "text", "text": " first "}, {"type": "text", "text": "second\n"}]},
        {"role": "assistant", "content": "\n  ünï 😀  \n"},
    ]
    assert render(messages, generation_prompt=False) == (
        "<bos><start_of_turn>user\n  Rules:\n- short \n\nfirstsecond<end_of_turn>\n<start_of_turn>model\nünï 😀<end_of_turn>\n"
    )


def test_system_given_as_text_parts_uses_the_first_part() -> None:
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "Hi"}]
    assert render(messages) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize(
    "roles",
    [
        ["assistant"],  # the model speaks first
        ["user", "user"],  # two user turns in a row
        ["user", "assistant", "assistant"],
        ["user", "system"],  # a system message after the first: Gemma 3 has no system turn
        ["system", "system", "user"],
        ["user", "tool"],  # tool results are written into a user turn before templating
    ],
)
def test_turns_that_do_not_alternate_are_refused(roles: list[str]) -> None:
    with pytest.raises(TemplateError, match=re.escape(ALTERNATE)):
        render([{"role": role, "content": "x"} for role in roles])


def test_non_text_content_is_refused() -> None:
    with pytest.raises(TemplateError, match="Only text content"):
        render([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}])
