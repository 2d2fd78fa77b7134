"""langchain-tests' standard integration tests for ChatGemmaMTP, on the memorizing plumbing fixture.

The model is the tiny Gemma 4 of `chat_fixtures.py`, loaded by path through the engine registry
(target + distilled MTP assistant). It memorized the exact prompts these tests send, so every
plumbing test (invoke, stream, batch, async, usage, stop, conversations, tool calls and tool-message
histories, structured output, JSON mode) runs the real template, engine, parser and LangChain
conversion end to end; none needs a capable model once its prompt is memorized, so none is
xfailed. The suite skips by itself what the class declares unsupported (image, audio and PDF
input: the path is text-only, see tests/unit/test_messages.py for its error) and what needs
configuration we do not have (per-call model override, VCR cassettes).
"""

from __future__ import annotations

from chat_fixtures import chat_checkpoint
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_gemma_mtp import ChatGemmaMTP


class TestChatGemmaMTPIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatGemmaMTP]:
        return ChatGemmaMTP

    @property
    def chat_model_params(self) -> dict:
        return {"model": str(chat_checkpoint())}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        # The second call of the same prompt reads all but its last token from the prefix cache.
        llm = ChatGemmaMTP(**self.chat_model_params)
        llm.invoke("Hello")
        if not stream:
            return llm.invoke("Hello")
        full = None
        for chunk in llm.stream("Hello"):
            full = chunk if full is None else full + chunk
        return full
