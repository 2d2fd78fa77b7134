"""`gemma-mtp serve`: one loaded model behind an OpenAI-compatible HTTP API, for many agent processes.

`create_app(runtime, settings)` builds the Starlette app over a ChatRuntime (the same runtime
ChatGemmaMTP uses in-process, so answers, tool calls and stop strings are identical);
`load_runtime(...)` loads one; `running_server(runtime)` serves it on loopback from a background
thread (tests, examples); `serve(...)` runs it in the foreground (the CLI).
"""

from .app import ServerSettings, create_app
from .running import LocalServer, load_runtime, running_server, serve, serve_in_subprocess

__all__ = ["LocalServer", "ServerSettings", "create_app", "load_runtime", "running_server", "serve", "serve_in_subprocess"]
