"""A tool loop round-trips through every published Gemma 4 template revision, thinking on and off.

Each step is what a Gemma 4 model writes (its own control tokens), parsed by the runtime's parser
for that prompt, turned into the next request's history, and rendered again through the revision's
template. Checked: the call and the thoughts come back exactly, the next prompt starts with the
tokens the model saw and wrote (so the prefix cache reuses them) wherever the revision replays
them, and the answer after the tool result parses from whatever state the prompt left the model
in (inside a thought channel for the July revision). No model runs: the outputs are written here.
"""

from __future__ import annotations

import json

import pytest
from chat_fixtures import build_target
from gemma4_revisions import EMPTY_THOUGHT, REVISIONS, Revision

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.formats.streaming import ParsedDelta
from langchain_gemma_mtp.runtime import ChatRequest, ChatRuntime, PreparedPrompt

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
THOUGHT, LATER_THOUGHT, ANSWER = "Find the weather first.", "Sunny, so say so.", "It is sunny in Paris."


@pytest.fixture(scope="module")
def target():
    return build_target()


def runtime_for(rev: Revision, target) -> ChatRuntime:
    tokenizer = rev.tokenizer()
    return ChatRuntime(Engine(target, tokenizer=tokenizer, name=rev.name), tokenizer, chat_template=rev.template)


def model_writes(runtime: ChatRuntime, prepared: PreparedPrompt, text: str) -> tuple[list[int], ParsedDelta]:
    """The ids of `text` as the model would write it (markers as control tokens), and what the
    prompt's parser makes of it (end-of-turn tokens stripped, as the runtime does)."""
    ids = runtime.tokenizer.encode(text, add_special_tokens=False)
    parsed = prepared.parser.feed(prepared.forced)
    parsed.extend(prepared.parser.feed(runtime.tokenizer.decode([t for t in ids if t not in runtime.stop_token_ids])))
    parsed.extend(prepared.parser.finish())
    return ids, parsed


def prepare(runtime: ChatRuntime, messages: list[dict], thinking: bool, **options) -> PreparedPrompt:
    return runtime.prepare(ChatRequest(messages=messages, tools=[WEATHER], reasoning=thinking, **options))


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking_off", "thinking_on"])
@pytest.mark.parametrize("rev", REVISIONS, ids=str)
def test_a_tool_loop_round_trips(rev: Revision, thinking: bool, target) -> None:
    runtime = runtime_for(rev, target)
    tokenizer = runtime.tokenizer
    first = prepare(runtime, QUESTION, thinking)
    prompt_text = tokenizer.decode(first.prompt_ids)
    assert prompt_text.endswith("<|turn>model\n" if thinking else rev.thinking_off_prompt)

    # Step 1: the model thinks (thinking on), calls the tool, and hands over with <|tool_response>.
    thought = f"<|channel>thought\n{THOUGHT}\n<channel|>" if thinking else ""
    out_ids, parsed = model_writes(runtime, first, thought + CALL + "<|tool_response>")
    assert parsed.content == "" and not parsed.invalid_tool_calls
    assert parsed.reasoning == (THOUGHT if thinking else "")  # without the channel's framing
    (call,) = [c for c in parsed.tool_calls if c.name]
    arguments = "".join(c.arguments for c in parsed.tool_calls)
    assert (call.name, json.loads(arguments)) == ("get_weather", {"city": "Paris"})

    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": parsed.content,
            "reasoning_content": parsed.reasoning,
            "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    second = prepare(runtime, history, thinking)
    # The next prompt starts with what the model saw, except the empty thought channel the large
    # templates add with thinking off and do not replay in history (a template fact, not ours).
    seen = first.prompt_ids
    if rev.size == "31b" and not thinking:
        empty = tokenizer.encode(EMPTY_THOUGHT, add_special_tokens=False)
        assert seen[-len(empty) :] == empty
        seen = seen[: -len(empty)]
    # From mid April on, the model turn is replayed token for token, thoughts included (the
    # stop token <|tool_response> is what the template writes next); the launch revision
    # replays neither thoughts nor the hand-over, and answers tools in a turn of their own.
    replayed = seen + out_ids if rev.release != "launch" else seen
    assert second.prompt_ids[: len(replayed)] == replayed
    assert "response:get_weather" in tokenizer.decode(second.prompt_ids) or rev.release == "launch"

    # Step 2: the answer, from the state the prompt left the model in.
    in_thought = tokenizer.decode(second.prompt_ids).endswith("<|channel>thought\n")
    assert in_thought == (thinking and rev.thought_after_tools)
    if thinking:
        answer = ("" if in_thought else "<|channel>thought\n") + f"{LATER_THOUGHT}\n<channel|>{ANSWER}<turn|>"
    else:
        answer = ANSWER + "<turn|>"
    _, final = model_writes(runtime, second, answer)
    assert (final.reasoning, final.content) == ((LATER_THOUGHT if thinking else ""), ANSWER)


@pytest.mark.parametrize(
    ("options", "answer", "expected"),
    [
        ({"tool_choice": "required"}, '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>', "call"),
        ({"response_format": {"type": "json_object"}}, '{"city": "Rome"}', "json"),
    ],
    ids=["forced_call", "json_mode"],
)
@pytest.mark.parametrize("thought", ["", "Rome, then."], ids=["closed_at_once", "thought_first"])
def test_forced_answers_after_an_open_thought_follow_it(options, answer, expected, thought, target) -> None:
    """The July revision ends the prompt after tool results inside an open thought channel, thinking
    on. The forced opening is then the grammar's, not the prompt's: the model finishes its thought
    (or closes it at once), and only the forced answer may follow."""
    rev = next(r for r in REVISIONS if r.thought_after_tools)
    runtime = runtime_for(rev, target)
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
    ]
    prepared = prepare(runtime, history, True, **options)
    assert runtime.tokenizer.decode(prepared.prompt_ids).endswith("<|channel>thought\n") and prepared.forced == ""
    assert prepared.constraint is not None
    ids, parsed = model_writes(runtime, prepared, thought + "<channel|>" + answer)
    assert prepared.constraint.matcher().try_consume_tokens(ids) == len(ids)
    content = runtime.tokenizer.encode(thought + "<channel|>Sure.", add_special_tokens=False)
    assert prepared.constraint.matcher().try_consume_tokens(content) < len(content)  # nothing but the forced answer
    assert parsed.reasoning == thought
    if expected == "call":
        assert [c.name for c in parsed.tool_calls if c.name] == ["get_weather"] and not parsed.content
    else:
        assert json.loads(parsed.content) == {"city": "Rome"} and not parsed.tool_calls
