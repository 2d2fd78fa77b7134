"""The wire's sampling fields: a request's processors cross HTTP unchanged, and every OpenAI/vLLM
field is honoured, refused at an answer-changing value, or a listed no-op (never dropped)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from langchain_gemma_mtp.runtime import ChatRequest
from langchain_gemma_mtp.wire import NO_OPS, UNHONOURED, ChatCompletionBody, request_body

MESSAGES = [{"role": "user", "content": "Hello"}]


def test_processors_cross_the_wire_unchanged() -> None:
    request = ChatRequest(
        messages=MESSAGES,
        temperature=0.7,
        min_p=0.1,
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        repetition_penalty=1.3,
        logit_bias={5: -100.0, 17: 2.5},
        min_tokens=3,
        stop_token_ids=[9],
        ignore_eos=True,
    )
    body = request_body(request, "m", stream=False)
    assert body["logit_bias"] == {"5": -100.0, "17": 2.5}  # JSON object keys are strings
    back = ChatCompletionBody.model_validate(body).to_request(default_max_tokens=512)
    assert back == request


def test_defaults_are_not_sent() -> None:
    body = request_body(ChatRequest(messages=MESSAGES), "m", stream=False)
    assert not body.keys() & {
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "logit_bias",
        "min_tokens",
        "stop_token_ids",
        "ignore_eos",
    }


def test_every_field_has_one_rule() -> None:
    honoured = set(ChatCompletionBody.model_fields) - set(UNHONOURED) - set(NO_OPS)
    assert not set(UNHONOURED) & set(NO_OPS)
    assert {
        "logit_bias",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "min_p",
        "min_tokens",
        "reasoning_effort",
    } <= honoured


@pytest.mark.parametrize("field", sorted(UNHONOURED))
def test_an_unhonoured_field_passes_only_at_a_neutral_value(field) -> None:
    for neutral in (None, *UNHONOURED[field]):
        ChatCompletionBody.model_validate({"model": "m", "messages": MESSAGES, field: neutral})
    with pytest.raises(ValidationError) as caught:
        ChatCompletionBody.model_validate({"model": "m", "messages": MESSAGES, field: {"some": "value"}})
    assert caught.value.errors()[0]["loc"] == (field,)


def test_true_is_not_one() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionBody.model_validate({"model": "m", "messages": MESSAGES, "n": True})


@pytest.mark.parametrize(
    ("effort", "kwargs", "thinking"),
    [
        (None, None, False),
        ("none", None, False),
        ("minimal", None, True),
        ("high", None, True),
        ("high", {"enable_thinking": False}, False),
        (None, {"enable_thinking": True}, True),
    ],
)
def test_reasoning_effort_maps_to_thinking(effort, kwargs, thinking) -> None:
    body = ChatCompletionBody.model_validate(
        {"model": "m", "messages": MESSAGES, "reasoning_effort": effort, "chat_template_kwargs": kwargs}
    )
    assert body.to_request(512).reasoning is thinking
