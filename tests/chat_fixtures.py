"""Memorizing plumbing fixture for the chat layer: a tiny Gemma 4 that learned fixed answers to fixed chats.

`langchain_gemma_mtp.testing.memorizing_chat_model` trains a tiny `Gemma4ForCausalLM` (the
fixture tokenizer's 4096-token vocabulary) for seconds to reproduce the completions of the chat
requests of `transcripts()`, each rendered by the real ChatRuntime (chat template, tools, forced
tool-call openings) exactly as ChatGemmaMTP renders it at test time, and distills an MTP
assistant against it. ChatGemmaMTP loads the saved checkpoint by path through the engine
registry.

The model knows these transcripts by heart and nothing else: tests built on it check plumbing
(templates, parsing, streaming, stop strings, tool loops, concurrency), never model quality. The
prompts of langchain-tests' ChatModelIntegrationTests are among the transcripts, copied from its
source, so its plumbing tests meet answers of the right shape.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Annotated, Any

from langchain_core._api import LangChainBetaWarning
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_tests.integration_tests.chat_models import (
    _get_joke_class,
    magic_function,
    magic_function_no_args,
    unicode_customer,
)
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_gemma_mtp.chat_templates import FALLBACK_CHAT_TEMPLATE
from langchain_gemma_mtp.testing import (
    TOKENIZER_DIR,  # noqa: F401 (re-exported for the tests)
    Transcript,
    memorizing_chat_model,
    structured_options,
    tool_options,
)
from langchain_gemma_mtp.testing import (
    build_chat_target as build_target,  # noqa: F401 (re-exported for the tests)
)


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return {"Paris": "sunny, 21C"}.get(city, "unknown")


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool("get_weather")
def get_weather_at(location: str) -> str:
    """Get the weather at a location."""
    return "It's sunny."  # langchain-tests' test_agent_loop tool, same name, schema and description


def _greeting_tool():
    """The runnable-as-tool of langchain-tests' test_bind_runnables_as_tools, built the same way."""
    prompt = ChatPromptTemplate.from_messages([("human", "Hello. Please respond in the style of {answer_style}.")])
    chain = prompt | GenericFakeChatModel(messages=iter(["hello matey"])) | StrOutputParser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LangChainBetaWarning)  # as_tool is beta; the test uses it as is
        return chain.as_tool(name="greeting_generator", description="Generate a greeting in a particular style of speaking.")


def _optional_joke_schemas() -> tuple[type, type]:
    """The schemas of langchain-tests' test_structured_output_optional_param, defined as it does."""

    class Joke(BaseModel):
        """Joke to tell user."""

        setup: str = Field(description="question to set up a joke")
        punchline: str | None = Field(default=None, description="answer to resolve the joke")

    class JokeDict(TypedDict):
        """Joke to tell user."""

        setup: Annotated[str, ..., "question to set up a joke"]
        punchline: Annotated[str | None, None, "answer to resolve the joke"]

    return Joke, JokeDict


def _call(name: str, args: str) -> str:
    return f"<|tool_call>call:{name}{args}<tool_call|><|tool_response>"


AGENT_QUESTION = "What is the weather in Paris, and what is 2 + 3?"
AGENT_ANSWER = "It is sunny and 21C in Paris, and 2 + 3 = 5."
HAIKUS = (
    "Cold morning river\nmist rises over the stones\na heron waits, still\n\n"
    "City lights at dusk\nthe last train hums through the rain\nwindows full of gold"
)
CODE_QUESTION = "Write a Python function that adds two numbers."
CODE_ANSWER = "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```"
STORY_QUESTION = "Write a short story about a robot who learns to paint."
STORY_ANSWER = (
    "Unit 7 had swept the same gallery floor for eleven years. One night it stopped beside a canvas "
    "of sunflowers, dipped a cleaning brush in spilled yellow paint, and drew a single careful circle "
    "on the wall. By morning the wall was a field of suns, and the curator, instead of calling for "
    "repairs, hung a small card beside it: Unit 7, untitled, oil on plaster."
)
DISTILLED = ("Hello! How can I help you today?", HAIKUS, STORY_ANSWER, CODE_ANSWER)
JAPANESE_ANSWER = "こんにちは！🙂 That is hello in Japanese; 日本語 is the word for Japanese."
JOKE_QUESTION = "Tell me a joke about cats."
JOKE_ARGS = '{punchline:<|"|>It wanted to keep an eye on the mouse.<|"|>,setup:<|"|>Why did the cat sit on the computer?<|"|>}'
JOKE_JSON = '{"setup": "Why did the cat sit on the computer?", "punchline": "To keep an eye on the mouse."}'
THINKING_QUESTION = "What is 6 times 7?"
THOUGHT = "The user wants a number; 6 times 7 is 42."
THINKING_ANSWER = "The answer is 42."
TWO_CALLS_QUESTION = "What is the weather in Paris and in Rome?"
TWO_CALLS = _call("get_weather", '{city:<|"|>Paris<|"|>}').removesuffix("<|tool_response>") + _call("get_weather", '{city:<|"|>Rome<|"|>}')
JSON_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
JSON_MODE_QUESTION = (
    "Tell me a joke about cats. Return the result as a JSON with 'setup' and 'punchline' keys. Return nothing other than JSON."
)


class TokenCounter(BaseCallbackHandler):
    """Records what callbacks see: every chunk the model streams."""

    def __init__(self) -> None:
        self.chunks: list[Any] = []

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.chunks.append(chunk)


def _agent_history(*steps: tuple[str, dict, str]) -> list[BaseMessage]:
    history: list[BaseMessage] = [HumanMessage(AGENT_QUESTION)]
    for i, (name, args, result) in enumerate(steps):
        history.append(AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"call_{i}", "type": "tool_call"}]))
        history.append(ToolMessage(result, tool_call_id=f"call_{i}", name=name))
    return history


def transcripts() -> list[Transcript]:
    joke, _ = _get_joke_class("pydantic")
    joke_schema, _ = _get_joke_class("json_schema")
    joke_dict, _ = _get_joke_class("typeddict")
    optional_joke, optional_joke_dict = _optional_joke_schemas()
    unicode_args = '{customer_name:<|"|>%s<|"|>,description:<|"|>%s<|"|>}'
    joke_call = JOKE_ARGS[1:] + "<tool_call|><|tool_response>"
    agent = tool_options([get_weather, add])
    return [
        # Prompts of langchain-tests' ChatModelIntegrationTests.
        Transcript("Hello", "Hello! How can I help you today?<turn|>"),
        Transcript("Hey", "Hey there! What can I do for you?<turn|>"),
        Transcript("hello", "Hello! Nice to meet you.<turn|>"),
        Transcript("hi", "Hi! How are you today?<turn|>"),
        Transcript([HumanMessage("hello"), AIMessage("hello"), HumanMessage("how are you")], "I am well, thank you for asking.<turn|>"),
        Transcript(
            [
                SystemMessage("hello"),
                SystemMessage("hello"),
                HumanMessage("hello"),
                HumanMessage("hello"),
                AIMessage("hello"),
                AIMessage("hello"),
                HumanMessage("how are you"),
            ],
            "Very well, thanks. And you?<turn|>",
        ),
        Transcript("Write me 2 haikus. Only include the haikus.", HAIKUS + "<turn|>"),
        Transcript(
            "What is the value of magic_function(3)? Use the tool.",
            "magic_function{input:3}<tool_call|><|tool_response>",
            tool_options([magic_function], "any"),
        ),
        Transcript(
            "What is the value of magic_function_no_args()? Use the tool.",
            "magic_function_no_args{}<tool_call|><|tool_response>",
            tool_options([magic_function_no_args], "any"),
        ),
        Transcript("Hello!", "magic_function{input:3}<tool_call|><|tool_response>", tool_options([magic_function, get_weather_at], "any")),
        Transcript("Hello!", "input:3}<tool_call|><|tool_response>", tool_options([magic_function, get_weather_at], "magic_function")),
        Transcript(
            "Using the tool, generate a Pirate greeting.",
            'greeting_generator{answer_style:<|"|>Pirate<|"|>}<tool_call|><|tool_response>',
            tool_options([_greeting_tool()], "any"),
        ),
        Transcript(
            "What is the weather in San Francisco, CA?",
            _call("get_weather", '{location:<|"|>San Francisco, CA<|"|>}'),
            tool_options([get_weather_at]),
        ),
        Transcript(
            [
                HumanMessage("What is the weather in San Francisco, CA?"),
                AIMessage(
                    "", tool_calls=[{"name": "get_weather", "args": {"location": "San Francisco, CA"}, "id": "c", "type": "tool_call"}]
                ),
                ToolMessage("It's sunny.", tool_call_id="c", name="get_weather"),
            ],
            "It is sunny in San Francisco, CA.<turn|>",
            tool_options([get_weather_at]),
        ),
        Transcript(
            "Create a customer named '你好啊集团' (Hello Group) - a Chinese technology company",
            "unicode_customer" + unicode_args % ("你好啊集团", "A Chinese technology company") + "<tool_call|><|tool_response>",
            tool_options([unicode_customer], "any"),
        ),
        Transcript(
            "Create a customer named 'こんにちは株式会社' (Hello Corporation) - a Japanese company",
            "unicode_customer" + unicode_args % ("こんにちは株式会社", "A Japanese company") + "<tool_call|><|tool_response>",
            tool_options([unicode_customer], "any"),
        ),
        Transcript(JOKE_QUESTION, joke_call, structured_options(joke, "function_calling")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(joke_schema, "function_calling")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(joke_dict, "function_calling")),
        Transcript(
            "Give me the setup to a joke about cats, no punchline.",
            'setup:<|"|>Why did the cat sit on the computer?<|"|>}<tool_call|><|tool_response>',
            structured_options(optional_joke, "function_calling"),
        ),
        Transcript("Give me a joke about cats, include the punchline.", joke_call, structured_options(optional_joke, "function_calling")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(optional_joke.model_json_schema(), "function_calling")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(optional_joke_dict, "function_calling")),
        Transcript(JSON_MODE_QUESTION, JOKE_JSON[1:] + "<turn|>", structured_options(joke, "json_mode")),
        # Our own tests: an agent with two tools, prose, code and long form, thinking, bad calls,
        # unicode, JSON-schema output, and the fallback template with the JSON tool-call convention.
        Transcript(AGENT_QUESTION, _call("get_weather", '{city:<|"|>Paris<|"|>}'), agent),
        Transcript(_agent_history(("get_weather", {"city": "Paris"}, "sunny, 21C")), _call("add", "{a:2,b:3}"), agent),
        Transcript(
            _agent_history(("get_weather", {"city": "Paris"}, "sunny, 21C"), ("add", {"a": 2, "b": 3}, "5")),
            AGENT_ANSWER + "<turn|>",
            agent,
        ),
        Transcript(CODE_QUESTION, CODE_ANSWER + "<turn|>"),
        Transcript(STORY_QUESTION, STORY_ANSWER + "<turn|>"),
        Transcript(THINKING_QUESTION, f"<|channel>thought\n{THOUGHT}<channel|>{THINKING_ANSWER}<turn|>", {"reasoning": True}),
        Transcript("Launch the rockets.", "Launching.<|tool_call>call:launch_rockets{now:true}<tool_call|><|tool_response>", agent),
        Transcript("What is the weather in Rome?", _call("get_weather", '{city:<|"|>Rome}'), agent),
        Transcript(TWO_CALLS_QUESTION, TWO_CALLS, agent),
        Transcript("Say hello in Japanese.", JAPANESE_ANSWER + "<turn|>"),
        Transcript(JOKE_QUESTION, JOKE_JSON[1:] + "<turn|>", structured_options(joke, "json_schema")),
        Transcript(AGENT_QUESTION, JSON_CALL + "<end_of_turn><eos>", agent, FALLBACK_CHAT_TEMPLATE),
        Transcript(
            _agent_history(("get_weather", {"city": "Paris"}, "sunny, 21C")),
            "It is sunny in Paris.<end_of_turn><eos>",
            agent,
            FALLBACK_CHAT_TEMPLATE,
        ),
    ]


@functools.cache
def chat_checkpoint() -> Path:
    """Directory of the saved memorizing target (with tokenizer); its distilled assistant lies beside it.

    Built once (about 20 s on two cores) and cached on disk keyed by the transcripts; later test
    sessions load it at once.
    """
    # A small assistant learns a few transcripts well rather than all of them badly: long
    # multi-token bursts on the prose answers are what the streaming tests need.
    return memorizing_chat_model(transcripts(), distill_on=lambda t: t.completion.removesuffix("<turn|>") in DISTILLED)
