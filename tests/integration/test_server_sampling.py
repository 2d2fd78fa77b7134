"""`gemma-mtp serve` honours sampling fields (penalties, logit_bias, min_p, min_tokens, stop_token_ids,
ignore_eos, reasoning_effort) as the in-process model does, and refuses with a 400 naming the field
every other answer-changing field: nothing is silently ignored.

Two real servers on loopback, driven with the official openai client and ChatGemmaMTP(base_url=...):
the memorizing chat fixture (known answers), and an untrained tiny model whose greedy answer repeats
one token, served with n-gram drafting and compared with plain decoding in process.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from chat_fixtures import (
    THINKING_ANSWER,
    THINKING_QUESTION,
    THOUGHT,
    TOKENIZER_DIR,
    build_target,
    chat_checkpoint,
)
from transformers import AutoTokenizer

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import NgramDrafter, NoDrafter
from langchain_gemma_mtp.runtime import ChatRequest, ChatRuntime
from langchain_gemma_mtp.server import ServerSettings, load_runtime, running_server

NAME = "tiny-chat"
HELLO_ANSWER = "Hello! How can I help you today?"
BABBLE = "xyz abc"  # the untrained model repeats itself on it (checked below)
BABBLE_TOKENS = 30


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, content: str, **kwargs):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], temperature=0, **kwargs)


@pytest.fixture(scope="module")
def memorizing():
    runtime = load_runtime(str(chat_checkpoint()))
    with running_server(runtime, ServerSettings(NAME, max_tokens_limit=1000)) as server:
        yield server, runtime


@pytest.fixture(scope="module")
def babbling():
    """The served engine drafts with n-grams; the reference decodes the same model plainly, in process."""
    model, tokenizer = build_target(seed=5), AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    served = ChatRuntime(Engine(model, NgramDrafter(), tokenizer, name=NAME))
    reference = ChatGemmaMTP(engine=Engine(model, NoDrafter(), tokenizer, name=NAME), max_tokens=BABBLE_TOKENS)
    with running_server(served, ServerSettings(NAME, max_tokens_limit=1000)) as server:
        yield server, reference


def test_logit_bias_banning_the_answers_first_token_changes_the_answer(memorizing) -> None:
    server, runtime = memorizing
    prompt = runtime.prepare(ChatRequest(messages=[{"role": "user", "content": "Hello"}])).prompt_ids
    first = runtime.engine.generate(prompt, max_new_tokens=1).token_ids[0]
    banned = ask(_client(server), "Hello", logit_bias={str(first): -100}).choices[0].message.content
    assert banned != HELLO_ANSWER
    local = ChatGemmaMTP(model=str(chat_checkpoint())).invoke("Hello", logit_bias={first: -100})
    assert banned == local.content
    remote = ChatGemmaMTP(base_url=server.base_url, model=NAME, logit_bias={first: -100})
    assert remote.invoke("Hello").content == banned
    # Without the bias the memorized answer is back: nothing leaks between requests.
    assert ask(_client(server), "Hello").choices[0].message.content == HELLO_ANSWER


PENALTIES = [
    {"frequency_penalty": 1.0},
    {"presence_penalty": 1.5},
    {"repetition_penalty": 1.5},
    {"frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.2, "min_p": 0.1},
]


@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: ",".join(p))
def test_penalties_change_a_repetitive_answer_as_the_in_process_reference_says(babbling, penalty) -> None:
    server, reference = babbling
    client = _client(server)
    plain = ask(client, BABBLE, max_tokens=BABBLE_TOKENS).choices[0].message.content
    ids = AutoTokenizer.from_pretrained(TOKENIZER_DIR).encode(plain, add_special_tokens=False)
    assert len(set(ids)) <= len(ids) // 2, plain  # repetitive: what the penalties act on
    openai_named = {k: v for k, v in penalty.items() if k in ("frequency_penalty", "presence_penalty")}
    extra = {k: v for k, v in penalty.items() if k not in openai_named}  # vLLM's names, as the client sends them
    reply = ask(client, BABBLE, max_tokens=BABBLE_TOKENS, extra_body=extra, **openai_named).choices[0].message.content
    assert reply != plain
    assert reply == reference.invoke(BABBLE, **penalty).content
    streamed = ask(client, BABBLE, max_tokens=BABBLE_TOKENS, stream=True, extra_body=extra, **openai_named)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply
    remote = ChatGemmaMTP(base_url=server.base_url, model=NAME, max_tokens=BABBLE_TOKENS)
    assert remote.invoke(BABBLE, **penalty).content == reply


def test_stop_token_ids_min_tokens_and_ignore_eos(memorizing) -> None:
    server, runtime = memorizing
    client = _client(server)
    hello = ask(client, "Hello")
    n = hello.usage.completion_tokens  # the answer and its end-of-turn token
    bang = runtime.tokenizer.encode("!", add_special_tokens=False)
    assert len(bang) == 1
    cut = ask(client, "Hello", extra_body={"stop_token_ids": bang})
    assert cut.choices[0].message.content == "Hello!" and cut.choices[0].finish_reason == "stop"
    longer = ask(client, "Hello", max_tokens=n + 20, extra_body={"min_tokens": n + 5})
    assert longer.usage.completion_tokens >= n + 5
    endless = ask(client, "Hello", max_tokens=n + 10, extra_body={"ignore_eos": True})
    assert endless.choices[0].finish_reason == "length" and endless.usage.completion_tokens == n + 10
    assert endless.choices[0].message.content.startswith(HELLO_ANSWER)


def test_reasoning_effort_turns_thinking_on_and_off(memorizing) -> None:
    server, runtime = memorizing
    client = _client(server)
    on = ask(client, THINKING_QUESTION, reasoning_effort="low").choices[0].message
    assert on.content == THINKING_ANSWER and on.model_extra["reasoning_content"] == THOUGHT
    # Off, the prompt has no thinking switch: the answer is the in-process one without reasoning.
    without = runtime.complete(ChatRequest(messages=[{"role": "user", "content": THINKING_QUESTION}], max_tokens=1000))
    off_reply = ask(client, THINKING_QUESTION, reasoning_effort="none")
    off = off_reply.choices[0].message
    # (The memorizing model opens a thought channel even unasked; E2B prompts leave it free to.)
    assert off.content == without["content"]
    assert off.model_extra.get("reasoning_content") == without["reasoning"]
    thinking_prompt = runtime.prepare(ChatRequest(messages=[{"role": "user", "content": THINKING_QUESTION}], reasoning=True)).prompt_ids
    assert off_reply.usage.prompt_tokens == len(
        runtime.prepare(ChatRequest(messages=[{"role": "user", "content": THINKING_QUESTION}])).prompt_ids
    )
    assert off_reply.usage.prompt_tokens != len(thinking_prompt)  # no <|think|> switch in the prompt
    # chat_template_kwargs.enable_thinking, when given, decides.
    kept_off = ask(client, THINKING_QUESTION, reasoning_effort="high", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert kept_off.choices[0].message.content == without["content"]
    assert kept_off.usage.prompt_tokens == off_reply.usage.prompt_tokens


UNHONOURED = [
    ("n", {"n": 2}),
    ("logprobs", {"logprobs": True}),
    ("top_logprobs", {"top_logprobs": 3}),
    ("prediction", {"prediction": {"type": "content", "content": "Hello"}}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("use_beam_search", {"extra_body": {"use_beam_search": True}}),
    ("best_of", {"extra_body": {"best_of": 3}}),
    ("length_penalty", {"extra_body": {"length_penalty": 0.5}}),
    ("guided_json", {"extra_body": {"guided_json": {"type": "object"}}}),
    ("structured_outputs", {"extra_body": {"structured_outputs": {"regex": "a+"}}}),
    ("prompt_logprobs", {"extra_body": {"prompt_logprobs": 1}}),
    ("allowed_token_ids", {"extra_body": {"allowed_token_ids": [5, 6]}}),
    ("bad_words", {"extra_body": {"bad_words": ["Hello"]}}),
    ("include_reasoning", {"extra_body": {"include_reasoning": False}}),
    ("echo", {"extra_body": {"echo": True}}),
    ("chat_template_kwargs", {"extra_body": {"chat_template_kwargs": {"thinking_budget": 10}}}),
    ("temprature", {"extra_body": {"temprature": 0.5}}),  # a typo is an unknown field: refused, not ignored
    ("logit_bias", {"logit_bias": {"hello": -100}}),
    ("logit_bias", {"logit_bias": {"99999999": -100}}),  # not a token id of this model
    ("min_tokens", {"max_tokens": 4, "extra_body": {"min_tokens": 5}}),
    ("repetition_penalty", {"extra_body": {"repetition_penalty": 0}}),
]


@pytest.mark.parametrize(("field", "options"), UNHONOURED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(UNHONOURED)])
def test_an_unhonoured_field_gets_a_400_naming_it_before_any_model_work(memorizing, field, options) -> None:
    server, runtime = memorizing
    steps = runtime.engine.counters.steps
    with pytest.raises(openai.BadRequestError) as caught:
        ask(_client(server), "Hello", **options)
    assert caught.value.status_code == 400 and field in caught.value.message
    assert runtime.engine.counters.steps == steps
    assert ask(_client(server), "Hello").choices[0].message.content == HELLO_ANSWER


def test_fields_that_change_nothing_are_accepted_at_their_neutral_values(memorizing) -> None:
    server, _ = memorizing
    neutral = ask(
        _client(server),
        "Hello",
        n=1,
        logprobs=False,
        user="u-1",
        metadata={"run": "x"},
        store=False,
        service_tier="auto",
        extra_body={"use_beam_search": False, "best_of": 1, "skip_special_tokens": True, "priority": 0, "request_id": "r-1", "top_k": -1},
    )
    assert neutral.choices[0].message.content == HELLO_ANSWER


def test_a_refusal_names_the_field_in_the_error_body(memorizing) -> None:
    server, _ = memorizing
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "use_beam_search": True}
    reply = httpx.post(f"{server.base_url}/chat/completions", json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "use_beam_search" and "not honoured" in error["message"]
