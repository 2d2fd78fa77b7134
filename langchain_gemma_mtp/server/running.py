"""Loading a model to serve, and running the app under uvicorn: in the foreground or on a background thread."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from ..backends import in_process_backend
from ..runtime import ChatRuntime
from .app import ServerSettings, create_app

STARTUP_TIMEOUT_S = 30.0


def load_runtime(
    model: str,
    drafter: str = "auto",
    assistant: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    mtp_stop_below: float | None = None,
    mtp_siblings: int | None = None,
    prefix_cache_mb: float | None = None,
    chat_template: str | None = None,
    kv_cache_mb: float | None = None,
) -> ChatRuntime:
    """The ChatRuntime of a model, loaded through the process-wide engine registry: a server and
    in-process ChatGemmaMTP instances with the same settings share one engine. chat_template (Jinja
    text) replaces the tokenizer's own; prefix_cache_mb sizes the engine's prefix cache (0: none);
    kv_cache_mb, when given, becomes that engine's KV-cache limit for every user of it."""
    runtime = in_process_backend(
        model, drafter, assistant, device, dtype, mtp_stop_below=mtp_stop_below, mtp_siblings=mtp_siblings, prefix_cache_mb=prefix_cache_mb
    ).runtime
    if kv_cache_mb is not None:
        runtime.engine.limit_kv_cache(kv_cache_mb)
    if chat_template is None:
        return runtime
    return ChatRuntime(runtime.engine, model_name=runtime.model_name, chat_template=chat_template)


def _config(runtime: ChatRuntime, settings: ServerSettings | None, log_level: str) -> uvicorn.Config:
    settings = settings or ServerSettings(served_model_name=runtime.model_name)
    # No lifespan: the model is loaded before the app exists, and nothing needs tearing down.
    return uvicorn.Config(create_app(runtime, settings), lifespan="off", log_level=log_level, timeout_graceful_shutdown=5)


def serve(
    runtime: ChatRuntime, settings: ServerSettings | None = None, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve in the foreground until interrupted (Ctrl-C)."""
    config = _config(runtime, settings, log_level)
    config.host, config.port = host, port
    uvicorn.Server(config).run()


@dataclass(frozen=True)
class LocalServer:
    """Where a background server listens."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What OpenAI clients and ChatGemmaMTP(base_url=...) take."""
        return f"{self.url}/v1"


@contextmanager
def running_server(
    runtime: ChatRuntime, settings: ServerSettings | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[LocalServer]:
    """Serve `runtime` from a background thread while the block runs (port 0: an ephemeral port).

    .. code-block:: python

        with running_server(load_runtime("path/to/model")) as server:
            llm = ChatGemmaMTP(base_url=server.base_url, model="path/to/model")
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(_config(runtime, settings, "warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gemma-mtp-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.01)
    try:
        yield LocalServer(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(STARTUP_TIMEOUT_S)
        sock.close()


@contextmanager
def serve_in_subprocess(serve_args: list[str], env: dict[str, str] | None = None, timeout_s: float = 300.0) -> Iterator[LocalServer]:
    """Run `gemma-mtp serve SERVE_ARGS` in a child process on a free loopback port until the block
    ends: how several agent processes share one model (examples, load tests, CLI tests)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "langchain_gemma_mtp.cli", "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env)
    server = LocalServer("127.0.0.1", port)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"`gemma-mtp serve` exited with {process.returncode} before serving")
            try:
                if httpx.get(f"{server.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"`gemma-mtp serve` did not come up on port {port} in {timeout_s:.0f} s")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        process.wait(30)
