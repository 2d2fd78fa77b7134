"""langchain-tests' standard unit tests for ChatGemmaMTP (construction, binding, params).

The model is a hub id that is not downloaded here (and the hub is unreachable): every test
constructs and binds without loading anything, or it would fail with ModelNotFoundError.
"""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_gemma_mtp import ChatGemmaMTP


class TestChatGemmaMTPUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatGemmaMTP]:
        return ChatGemmaMTP

    @property
    def chat_model_params(self) -> dict:
        return {"model": "google/gemma-4-E2B-it"}
