"""Memorizing plumbing fixture for the chat layer: a tiny Gemma 4 that learned fixed answers to fixed chats.

A tiny `Gemma4ForCausalLM` with the fixture tokenizer's 4096-token vocabulary is trained for
seconds to reproduce the completions of the chat requests of `transcripts()`, each rendered by the
real ChatRuntime (chat template, tools, forced tool-call openings) exactly as ChatGemmaMTP renders
it at test time. An MTP assistant is distilled against it, and both are saved as a checkpoint
(`tiny-chat` beside `tiny-chat-assistant`) that ChatGemmaMTP loads by path through the engine
registry.

The model knows these transcripts by heart and nothing else: tests built on it check plumbing
(templates, parsing, streaming, stop strings, tool loops, concurrency), never model quality. The
prompts of langchain-tests' ChatModelIntegrationTests are among the transcripts, copied from its
source, so its plumbing tests meet answers of the right shape.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
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
from transformers import AutoTokenizer, Gemma4ForCausalLM, GenerationConfig
from typing_extensions import TypedDict

from langchain_gemma_mtp.distill import distill_assistant
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.messages import from_langchain
from langchain_gemma_mtp.runtime import FALLBACK_CHAT_TEMPLATE, ChatRequest, ChatRuntime
from tiny_models import build_assistant, gemma4_text_config

TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "tokenizer"
CONTEXT = 1024
EOS, TURN_END = 1, 5  # <eos>, <turn|>


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


# Binds call options exactly as users do; never loads a model (nothing here is invoked).
_BINDER = ChatGemmaMTP(model="fixture-binder")


def tool_options(tools: list[Any], tool_choice: Any = None) -> dict[str, Any]:
    """The call options `bind_tools` stores."""
    return dict(_BINDER.bind_tools(tools, tool_choice=tool_choice).kwargs)


def structured_options(schema: Any, method: str) -> dict[str, Any]:
    """The call options `with_structured_output` binds (its tracing entry left out, as LangChain does)."""
    options = dict(_BINDER.with_structured_output(schema, method=method).first.kwargs)
    options.pop("ls_structured_output_format")
    return options


@dataclass
class Transcript:
    """One chat request (LangChain input and call options) and the completion the model learns."""

    input: str | list[BaseMessage]
    completion: str  # output text after the prompt (and after any forced opening), end marker included
    options: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # None: the tokenizer's (Gemma 4) template

    def request(self) -> ChatRequest:
        messages = [HumanMessage(self.input)] if isinstance(self.input, str) else self.input
        return ChatRequest(messages=from_langchain(messages), **self.options)


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
            [SystemMessage("hello"), SystemMessage("hello"), HumanMessage("hello"), HumanMessage("hello"),
             AIMessage("hello"), AIMessage("hello"), HumanMessage("how are you")],
            "Very well, thanks. And you?<turn|>",
        ),
        Transcript("Write me 2 haikus. Only include the haikus.", HAIKUS + "<turn|>"),
        Transcript("What is the value of magic_function(3)? Use the tool.", "magic_function{input:3}<tool_call|><|tool_response>",
                   tool_options([magic_function], "any")),
        Transcript("What is the value of magic_function_no_args()? Use the tool.",
                   "magic_function_no_args{}<tool_call|><|tool_response>", tool_options([magic_function_no_args], "any")),
        Transcript("Hello!", "magic_function{input:3}<tool_call|><|tool_response>", tool_options([magic_function, get_weather_at], "any")),
        Transcript("Hello!", "input:3}<tool_call|><|tool_response>", tool_options([magic_function, get_weather_at], "magic_function")),
        Transcript("Using the tool, generate a Pirate greeting.",
                   'greeting_generator{answer_style:<|"|>Pirate<|"|>}<tool_call|><|tool_response>', tool_options([_greeting_tool()], "any")),
        Transcript("What is the weather in San Francisco, CA?",
                   _call("get_weather", '{location:<|"|>San Francisco, CA<|"|>}'), tool_options([get_weather_at])),
        Transcript(
            [HumanMessage("What is the weather in San Francisco, CA?"),
             AIMessage("", tool_calls=[{"name": "get_weather", "args": {"location": "San Francisco, CA"}, "id": "c", "type": "tool_call"}]),
             ToolMessage("It's sunny.", tool_call_id="c", name="get_weather")],
            "It is sunny in San Francisco, CA.<turn|>", tool_options([get_weather_at]),
        ),
        Transcript("Create a customer named '你好啊集团' (Hello Group) - a Chinese technology company",
                   "unicode_customer" + unicode_args % ("你好啊集团", "A Chinese technology company") + "<tool_call|><|tool_response>",
                   tool_options([unicode_customer], "any")),
        Transcript("Create a customer named 'こんにちは株式会社' (Hello Corporation) - a Japanese company",
                   "unicode_customer" + unicode_args % ("こんにちは株式会社", "A Japanese company") + "<tool_call|><|tool_response>",
                   tool_options([unicode_customer], "any")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(joke, "function_calling")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(joke_schema, "function_calling")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(joke_dict, "function_calling")),
        Transcript("Give me the setup to a joke about cats, no punchline.",
                   'setup:<|"|>Why did the cat sit on the computer?<|"|>}<tool_call|><|tool_response>',
                   structured_options(optional_joke, "function_calling")),
        Transcript("Give me a joke about cats, include the punchline.", joke_call, structured_options(optional_joke, "function_calling")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(optional_joke.model_json_schema(), "function_calling")),
        Transcript(JOKE_QUESTION, joke_call, structured_options(optional_joke_dict, "function_calling")),
        Transcript(JSON_MODE_QUESTION, JOKE_JSON[1:] + "<turn|>", structured_options(joke, "json_mode")),
        # Our own tests: an agent with two tools, prose, code and long form, thinking, bad calls,
        # unicode, JSON-schema output, and the fallback template with the JSON tool-call convention.
        Transcript(AGENT_QUESTION, _call("get_weather", '{city:<|"|>Paris<|"|>}'), agent),
        Transcript(_agent_history(("get_weather", {"city": "Paris"}, "sunny, 21C")), _call("add", "{a:2,b:3}"), agent),
        Transcript(_agent_history(("get_weather", {"city": "Paris"}, "sunny, 21C"), ("add", {"a": 2, "b": 3}, "5")),
                   AGENT_ANSWER + "<turn|>", agent),
        Transcript(CODE_QUESTION, CODE_ANSWER + "<turn|>"),
        Transcript(STORY_QUESTION, STORY_ANSWER + "<turn|>"),
        Transcript(THINKING_QUESTION, f"<|channel>thought\n{THOUGHT}<channel|>{THINKING_ANSWER}<turn|>", {"reasoning": True}),
        Transcript("Launch the rockets.", "Launching.<|tool_call>call:launch_rockets{now:true}<tool_call|><|tool_response>", agent),
        Transcript("What is the weather in Rome?", _call("get_weather", '{city:<|"|>Rome}'), agent),
        Transcript(TWO_CALLS_QUESTION, TWO_CALLS, agent),
        Transcript("Say hello in Japanese.", JAPANESE_ANSWER + "<turn|>"),
        Transcript(JOKE_QUESTION, JOKE_JSON[1:] + "<turn|>", structured_options(joke, "json_schema")),
        Transcript(AGENT_QUESTION, JSON_CALL + "<end_of_turn><eos>", agent, FALLBACK_CHAT_TEMPLATE),
        Transcript(_agent_history(("get_weather", {"city": "Paris"}, "sunny, 21C")), "It is sunny in Paris.<end_of_turn><eos>",
                   agent, FALLBACK_CHAT_TEMPLATE),
    ]


def build_target(seed: int = 0) -> Gemma4ForCausalLM:
    config = gemma4_text_config(shared=True, ple=True, vocab=4096)
    config.max_position_embeddings = CONTEXT
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=0, bos_token_id=2)
    return model.eval()


def training_sequences(engine: Engine, items: list[Transcript]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each transcript, rendered by a ChatRuntime itself."""
    runtimes = {t.chat_template: ChatRuntime(engine, chat_template=t.chat_template) for t in items}
    tokenizer = engine.tokenizer
    return [
        (runtimes[t.chat_template].prepare(t.request()).prompt_ids, tokenizer.encode(t.completion, add_special_tokens=False))
        for t in items
    ]


def _batches(sequences: list[tuple[list[int], list[int]]], size: int = 6) -> list[tuple[torch.Tensor, ...]]:
    """Padded batches of similar length; labels only on completions (prompts are context, not targets)."""
    ordered = sorted(sequences, key=lambda s: len(s[0]) + len(s[1]))
    batches = []
    for start in range(0, len(ordered), size):
        group = ordered[start : start + size]
        width = max(len(p) + len(c) for p, c in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (prompt, completion) in enumerate(group):
            seq = prompt + completion
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(prompt) : len(seq)] = torch.tensor(completion)
        batches.append((ids, mask, labels))
    return batches


def memorize_completions(model: Gemma4ForCausalLM, sequences: list[tuple[list[int], list[int]]], max_epochs: int = 60) -> int:
    """Train until every completion token is the argmax under teacher forcing; return the epochs used."""
    batches = _batches(sequences)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(1, max_epochs + 1):
        model.train()
        for ids, mask, labels in batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch >= 10 and epoch % 2 == 0 and _all_memorized(model, batches):
            model.eval()
            return epoch
    model.eval()
    raise AssertionError(f"the fixture did not memorize its transcripts in {max_epochs} epochs")


@torch.no_grad()
def _all_memorized(model: Gemma4ForCausalLM, batches: list[tuple[torch.Tensor, ...]]) -> bool:
    model.eval()
    for ids, mask, labels in batches:
        predicted = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        if not bool(((predicted == target) | (target == -100)).all()):
            return False
    return True


@functools.cache
def chat_checkpoint() -> Path:
    """Directory of the saved memorizing target (with tokenizer); its distilled assistant lies beside it.

    Built once per test process (about 20 s on two cores) and removed at exit.
    """
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    target = build_target()
    items = transcripts()
    sequences = training_sequences(Engine(target, tokenizer=tokenizer, name="tiny-chat"), items)
    memorize_completions(target, sequences)
    assistant = build_assistant(target, ordered=False, seed=4)
    # A small assistant learns a few transcripts well rather than all of them badly: long
    # multi-token bursts on the prose answers are what the streaming tests need.
    drafted = [p + c for (p, c), t in zip(sequences, items) if t.completion.removesuffix("<turn|>") in DISTILLED]
    distill_assistant(assistant, TargetModel(target), drafted, steps=160, draft_steps=4)
    root = Path(tempfile.mkdtemp(prefix="gemma-mtp-chat-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target.save_pretrained(root / "tiny-chat")
    tokenizer.save_pretrained(root / "tiny-chat")
    assistant.save_pretrained(root / "tiny-chat-assistant")
    print(f"memorizing chat fixture built in {time.perf_counter() - started:.1f}s")
    return root / "tiny-chat"
