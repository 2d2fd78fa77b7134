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

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        # Port 9 (discard) refuses at once: the profile's /v1/models probe does not wait.
        env = {"GEMMA_MTP_BASE_URL": "http://127.0.0.1:9/v1", "GEMMA_MTP_API_KEY": "key-from-env"}
        return env, {"model": "gemma-4-E2B-it"}, {"base_url": "http://127.0.0.1:9/v1", "api_key": "key-from-env"}
