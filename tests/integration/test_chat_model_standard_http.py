"""langchain-tests' standard integration tests for ChatGemmaMTP(base_url=...) against `gemma-mtp serve`.

The same suite as test_chat_model_standard_integration.py, on the same memorizing plumbing
fixture, but every call crosses HTTP: ChatGemmaMTP's HTTPBackend talks to our server on an
ephemeral loopback port, which runs the fixture through the same ChatRuntime. Passing it shows
that everything ChatGemmaMTP does in-process works the same over HTTP.
"""

from __future__ import annotations

import pytest
import test_chat_model_standard_integration as in_process  # a module, so its class is not collected twice
from chat_fixtures import chat_checkpoint

from langchain_gemma_mtp.server import ServerSettings, load_runtime, running_server

NAME = "tiny-chat"


@pytest.fixture(scope="module", autouse=True)
def served():
    with running_server(load_runtime(str(chat_checkpoint())), ServerSettings(NAME)) as server:
        TestChatGemmaMTPOverHTTP.base_url = server.base_url
        yield


class TestChatGemmaMTPOverHTTP(in_process.TestChatGemmaMTPIntegration):
    base_url = ""

    @property
    def chat_model_params(self) -> dict:
        return {"model": NAME, "base_url": self.base_url}
