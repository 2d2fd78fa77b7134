"""What other LangChain parts and users ask of ChatGemmaMTP besides chat: token counts (in process,
over HTTP, and the server's vLLM-style /tokenize), `trim_messages` with the model as counter, the
model profile driving create_agent's summarization middleware, client configuration (environment,
headers, httpx options, Retry-After), and a client-only process without torch.

The model is the memorizing plumbing fixture of `chat_fixtures.py`: these tests check plumbing
(the same prompt counted everywhere as the engine sees it), never model quality. Servers run on
loopback on ephemeral ports.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from chat_fixtures import AGENT_QUESTION, add, chat_checkpoint, get_weather
from langchain.agents import create_agent
from langchain.agents.middleware import SummarizationMiddleware
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage, trim_messages
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from transformers import AutoTokenizer

import langchain_gemma_mtp
from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.errors import ModelNotFoundError
from langchain_gemma_mtp.messages import convert_tools, from_langchain
from langchain_gemma_mtp.runtime import ChatRequest
from langchain_gemma_mtp.server import ServerSettings, load_runtime, running_server

NAME = "tiny-chat"
HELLO_ANSWER = "Hello! How can I help you today?"  # memorized
CONTEXT = 1024  # the memorizing fixture's max_position_embeddings
TOOLS = [get_weather, add]
CONVERSATION = [
    SystemMessage("You are terse."),
    HumanMessage("What's the weather in Paris?"),
    AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
    ToolMessage("sunny, 21C", tool_call_id="call_1"),
    HumanMessage("Thanks. <turn|> is not a marker here."),
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def path() -> str:
    return str(chat_checkpoint())


@pytest.fixture(scope="module")
def runtime(path):
    return load_runtime(path)


@pytest.fixture(scope="module")
def server(runtime):
    with running_server(runtime, ServerSettings(NAME)) as local:
        yield local


@pytest.fixture(scope="module")
def local(path) -> ChatGemmaMTP:
    return ChatGemmaMTP(model=path, max_tokens=40)


@pytest.fixture(scope="module")
def remote(server) -> ChatGemmaMTP:
    return ChatGemmaMTP(base_url=server.base_url, model=NAME, max_tokens=40)


def engine_prompt(runtime, messages, tools=None) -> list[int]:
    """The ids the engine is given for a call with these messages and tools."""
    return runtime.prepare(ChatRequest(messages=from_langchain(messages), tools=convert_tools(tools) if tools else None)).prompt_ids


# -- token counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_message_counts_are_the_engine_prompt_length_in_process_and_over_http(local, remote, runtime, tools) -> None:
    expected = len(engine_prompt(runtime, CONVERSATION, tools))
    assert local.get_num_tokens_from_messages(CONVERSATION, tools=tools) == expected
    assert remote.get_num_tokens_from_messages(CONVERSATION, tools=tools) == expected
    assert local.get_num_tokens_from_messages([]) == 0


def test_counts_equal_the_input_tokens_of_a_real_call(local, remote) -> None:
    question = [HumanMessage(AGENT_QUESTION)]
    for llm in (local, remote):
        reply = llm.bind_tools(TOOLS).invoke(question)
        assert reply.usage_metadata["input_tokens"] == llm.get_num_tokens_from_messages(question, tools=TOOLS)
        assert llm.invoke("Hello").usage_metadata["input_tokens"] == llm.get_num_tokens_from_messages([HumanMessage("Hello")])


def test_text_counts_use_the_model_tokenizer_with_markers_as_text(local, remote, path) -> None:
    text = "Hello <turn|> world"
    expected = AutoTokenizer.from_pretrained(path).encode(text, add_special_tokens=False, split_special_tokens=True)
    assert local.get_token_ids(text) == remote.get_token_ids(text) == expected
    assert local.get_num_tokens(text) == len(expected)


def test_trim_messages_with_the_model_as_token_counter(local, remote) -> None:
    history = [SystemMessage("You are terse.")]
    for turn in range(8):
        history += [HumanMessage(f"Question number {turn} about the weather?"), AIMessage(f"Answer number {turn}: sunny.")]
    history.append(HumanMessage("And now?"))
    budget = local.get_num_tokens_from_messages(history) // 2
    kept = {}
    for name, llm in (("local", local), ("remote", remote)):
        trimmed = trim_messages(history, max_tokens=budget, token_counter=llm, strategy="last", start_on="human", include_system=True)
        assert 2 < len(trimmed) < len(history)
        assert isinstance(trimmed[0], SystemMessage) and trimmed[-1].content == "And now?"
        assert llm.get_num_tokens_from_messages(trimmed) <= budget
        kept[name] = [m.content for m in trimmed]
    assert kept["local"] == kept["remote"]
    # A conversation longer than the context is counted (and so can be trimmed), not refused.
    too_long = [HumanMessage("The quick brown fox jumps over the lazy dog. " * 200)]
    assert local.get_num_tokens_from_messages(too_long) == remote.get_num_tokens_from_messages(too_long) > CONTEXT


# -- the server's tokenize routes ---------------------------------------------------------------------


def test_tokenize_equals_in_process_counts_and_detokenize_reverses_it(server, runtime, local) -> None:
    wire = {"model": NAME, "messages": [{"role": "user", "content": "What's the weather in Paris?"}], "tools": convert_tools(TOOLS)}
    answer = httpx.post(f"{server.url}/tokenize", json={**wire, "return_token_strs": True}).json()
    expected = local.get_num_tokens_from_messages([HumanMessage("What's the weather in Paris?")], tools=TOOLS)
    assert answer["count"] == len(answer["tokens"]) == expected
    assert answer["max_model_len"] == CONTEXT
    assert answer["token_strs"] == runtime.tokenizer.convert_ids_to_tokens(answer["tokens"])
    text = httpx.post(f"{server.url}/detokenize", json={"model": NAME, "tokens": answer["tokens"]}).json()["prompt"]
    assert text == runtime.tokenizer.decode(answer["tokens"])
    assert "get_weather" in text and "<|turn>model\n" in text
    plain = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello", "add_special_tokens": False}).json()
    assert plain["tokens"] == local.get_token_ids("Hello")


@pytest.mark.parametrize(
    "route, body, status, needle",
    [
        ("/tokenize", {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, 400, "either prompt"),
        ("/tokenize", {}, 400, "either prompt"),
        ("/tokenize", {"model": "other", "prompt": "Hi"}, 404, "this server serves 'tiny-chat'"),
        ("/tokenize", {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": False}, 400, "add_generation_prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}, 400, "tool"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "outside this model's vocabulary"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
def test_bad_tokenize_requests_get_openai_errors(server, route, body, status, needle) -> None:
    reply = httpx.post(f"{server.url}{route}", json=body)
    assert reply.status_code == status
    assert needle in reply.json()["error"]["message"]


def test_version_route_and_the_metrics_content_type(server) -> None:
    from prometheus_client import CONTENT_TYPE_LATEST

    assert httpx.get(f"{server.url}/version").json() == {"version": langchain_gemma_mtp.__version__}
    assert httpx.get(f"{server.url}/metrics").headers["content-type"] == CONTENT_TYPE_LATEST


# -- the model profile --------------------------------------------------------------------------------


def test_profile_has_the_context_size_from_config_engine_and_server(path, runtime, remote) -> None:
    for llm in (ChatGemmaMTP(model=path), ChatGemmaMTP(engine=runtime.engine), remote):
        assert llm.profile["max_input_tokens"] == CONTEXT
        assert llm.profile["tool_calling"] and llm.profile["tool_choice"] and llm.profile["reasoning_output"]
        assert llm.profile["structured_output"] is False  # create_agent picks ToolStrategy: enforced forced calls
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = ChatGemmaMTP(base_url=f"http://127.0.0.1:{port}/v1", model=NAME)
    assert "max_input_tokens" not in down.profile and down.profile["tool_calling"]


def test_summarization_middleware_with_a_fractional_trigger_runs_on_the_model(path) -> None:
    llm = ChatGemmaMTP(model=path, max_tokens=24)
    summarizer = SummarizationMiddleware(
        model=llm, trigger=("fraction", 0.1), keep=("messages", 1), summary_prompt="Summarize:\n{messages}"
    )
    agent = create_agent(llm, tools=[], middleware=[summarizer])
    history = []
    for turn in range(6):
        history += [HumanMessage(f"Tell me about topic {turn} in a few words."), AIMessage(f"Topic {turn} is about the weather.")]
    assert llm.get_num_tokens_from_messages(history) > 0.1 * CONTEXT
    messages = agent.invoke({"messages": [*history, HumanMessage("Hello")]})["messages"]
    assert len(messages) < len(history)
    assert "summary" in messages[0].content.lower()  # the middleware's summary replaced the old turns
    assert isinstance(messages[-1], AIMessage)


# -- client configuration -----------------------------------------------------------------------------


def test_base_url_and_api_key_from_the_environment_headers_and_httpx_options(runtime, monkeypatch) -> None:
    seen: list[httpx.Request] = []
    with running_server(runtime, ServerSettings(NAME, api_key="secret")) as keyed:
        monkeypatch.setenv("GEMMA_MTP_BASE_URL", keyed.base_url)
        monkeypatch.setenv("GEMMA_MTP_API_KEY", "secret")
        llm = ChatGemmaMTP(model=NAME, default_headers={"X-Team": "agents"}, client_kwargs={"event_hooks": {"request": [seen.append]}})
        assert llm.base_url == keyed.base_url
        assert llm.invoke("Hello").content == HELLO_ANSWER
        assert seen and seen[-1].headers["x-team"] == "agents" and seen[-1].headers["authorization"] == "Bearer secret"
        # A ready engine runs here whatever the environment says.
        assert ChatGemmaMTP(engine=runtime.engine).base_url is None


class _Busy:
    """A loopback server that turns the first request away with 429 and Retry-After, then answers."""

    def __init__(self, retry_after: str) -> None:
        self.retry_after = retry_after
        self.arrivals: list[float] = []

    async def chat(self, request: Request) -> JSONResponse:
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) == 1:
            return JSONResponse({"error": {"message": "busy"}}, status_code=429, headers={"Retry-After": self.retry_after})
        message = {"role": "assistant", "content": "ok"}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        return JSONResponse({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage})


def test_retries_wait_for_retry_after() -> None:
    busy = _Busy("1.5")
    app = Starlette(routes=[Route("/v1/chat/completions", busy.chat, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        llm = ChatGemmaMTP(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", model=NAME, max_retries=1, profile={})
        assert llm.invoke("Hi").content == "ok"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    # Without Retry-After the first backoff is 0.5-0.625 s; the server asked for 1.5 s.
    assert busy.arrivals[1] - busy.arrivals[0] >= 1.5


def test_retry_waits_carry_jitter() -> None:
    from langchain_gemma_mtp.http_backend import JITTER, _delay

    told = httpx.Response(429, headers={"Retry-After": "2"})
    waits = {_delay(told, 0) for _ in range(20)}
    assert len(waits) > 1 and all(2.0 <= w <= 2.0 * (1 + JITTER) for w in waits)
    dated = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # in the past: retry now
    assert _delay(dated, 0) == 0.0
    backoff = {_delay(httpx.Response(503), 2) for _ in range(20)}
    assert len(backoff) > 1 and all(2.0 <= w <= 2.0 * (1 + JITTER) for w in backoff)


# -- loading options --------------------------------------------------------------------------------


def test_model_kwargs_reach_from_pretrained_and_unknown_ones_are_refused(path) -> None:
    from langchain_gemma_mtp.engine import Engine

    for attention in ("eager", "sdpa"):
        engine = Engine.from_pretrained(path, drafter="none", load_options={"attn_implementation": attention})
        assert engine.model.config._attn_implementation == attention
    with pytest.raises(ValueError, match=r"unknown model_kwargs \['device_map'\]: use \['attn_implementation', 'revision'"):
        ChatGemmaMTP(model=path, model_kwargs={"device_map": "auto"})
    with pytest.raises(ValueError, match="model_kwargs apply when this class loads the model itself"):
        ChatGemmaMTP(base_url="http://127.0.0.1:9/v1", model_kwargs={"revision": "main"}, profile={})


def test_a_gated_repository_error_says_how_to_log_in(monkeypatch) -> None:
    # The one mock: the hub cannot be reached here, so snapshot_download answers as the hub does for
    # a gated repository without a token (and records what it was given).
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    calls: list[dict] = []

    def gated(repo_id: str, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        answer = httpx.Response(401, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise GatedRepoError(f"401 Client Error. Cannot access gated repo {repo_id}.", response=answer)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    llm = ChatGemmaMTP(model="google/gemma-4-E2B-it", drafter="ngram", model_kwargs={"revision": "v1", "token": "hf_abc"})
    with pytest.raises(ModelNotFoundError, match=r"gated.*`hf auth login`.*HF_TOKEN"):
        llm.invoke("Hello")
    assert {"revision": "v1", "token": "hf_abc"}.items() <= calls[-1].items()


# -- a client without torch ---------------------------------------------------------------------------

BLOCKER = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    BLOCKED = {"torch", "transformers", "tokenizers", "safetensors", "huggingface_hub"}

    class Blocker(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def test_a_client_without_torch_calls_a_server_and_in_process_use_names_the_extra(server) -> None:
    done = run_without_torch(
        f"""
        import json
        from langchain_core.messages import HumanMessage
        from langchain_gemma_mtp import ChatGemmaMTP
        from langchain_gemma_mtp.errors import MissingDependencyError

        llm = ChatGemmaMTP(base_url={server.base_url!r}, model={NAME!r})
        result = {{
            "answer": llm.invoke("Hello").content,
            "count": llm.get_num_tokens_from_messages([HumanMessage("Hello")]),
            "context": llm.profile.get("max_input_tokens"),
        }}
        try:
            ChatGemmaMTP(model="google/gemma-4-E2B-it")
        except MissingDependencyError as exc:
            result["error"] = str(exc)
        result["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps(result))
        """
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["answer"] == HELLO_ANSWER
    assert result["count"] == ChatGemmaMTP(base_url=server.base_url, model=NAME).get_num_tokens_from_messages([HumanMessage("Hello")])
    assert result["context"] == CONTEXT
    assert "pip install 'langchain-gemma-mtp[local]'" in result["error"] and "base_url=" in result["error"]
    assert result["loaded"] == []


def test_cli_help_and_version_answer_without_torch() -> None:
    done = run_without_torch(
        """
        from langchain_gemma_mtp import cli
        for argv in (["--version"], ["--help"], ["serve", "--help"], ["demo", "--help"], ["distill", "--help"]):
            try:
                cli.main(argv)
            except SystemExit as exc:
                assert exc.code == 0, (argv, exc.code)
        """
    )
    assert done.returncode == 0, done.stderr
    assert f"gemma-mtp {langchain_gemma_mtp.__version__}" in done.stdout
    assert "--chat-template FILE" in done.stdout and "--prefix-cache-mb MB" in done.stdout


def test_every_cli_option_has_help() -> None:
    import argparse

    from langchain_gemma_mtp import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"{name} {action.option_strings[0]}"
        for name, sub in [("gemma-mtp", parser), *commands.items()]
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert missing == []


def test_cli_log_level_shows_our_info_lines(path, capsys) -> None:
    import logging

    from langchain_gemma_mtp import cli

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("langchain_gemma_mtp").setLevel(logging.NOTSET)  # as in a fresh process
        cli.main(["demo", "--model", path, "--max-tokens", "4", "--drafter", "none", "--log-level", "info"])
    finally:
        logging.getLogger().removeHandler(handler)
    assert any(r.getMessage().startswith(f"loaded {path}") for r in records)
    assert logging.getLogger("langchain_gemma_mtp").level == logging.INFO
    capsys.readouterr()


def test_serve_flags_for_chat_template_and_prefix_cache(path, server, tmp_path) -> None:
    from langchain_gemma_mtp.chat_templates import FALLBACK_CHAT_TEMPLATE
    from langchain_gemma_mtp.server import serve_in_subprocess

    template = tmp_path / "template.jinja"
    template.write_text(FALLBACK_CHAT_TEMPLATE)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GEMMA_MTP_DTYPE": "float32"}
    args = ["--model", path, "--served-model-name", NAME, "--chat-template", str(template), "--prefix-cache-mb", "0"]
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi there, default cache"}]}
    for _ in range(2):  # with the default cache, the second call reads its prompt from it
        usage = httpx.post(f"{server.base_url}/chat/completions", json={**chat, "max_tokens": 2}).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    with serve_in_subprocess(args, env=env, timeout_s=120) as served:
        chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}]}
        ids = httpx.post(f"{served.url}/tokenize", json=chat).json()["tokens"]
        text = httpx.post(f"{served.url}/detokenize", json={"tokens": ids}).json()["prompt"]
        assert text.endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
        for _ in range(2):  # --prefix-cache-mb 0: nothing is kept to read
            usage = httpx.post(f"{served.base_url}/chat/completions", json={**chat, "max_tokens": 2}).json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    with pytest.raises(SystemExit, match="cannot read --chat-template"):
        from langchain_gemma_mtp import cli

        cli.main(["serve", "--model", path, "--chat-template", str(tmp_path / "missing.jinja")])
