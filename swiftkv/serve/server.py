"""`swiftkv serve`: the app under uvicorn, with an exit status a supervisor can act on.

SIGTERM/SIGINT stop accepting connections and give in-flight requests `shutdown_timeout_s` to finish before
they are cancelled. If the engine thread dies, the server shuts down the same way and exits with status 1.
"""

from __future__ import annotations

import threading

import uvicorn

from swiftkv.engine.llm_engine import LLMEngine
from swiftkv.serve.app import create_app
from swiftkv.serve.config import ServerConfig
from swiftkv.serve.memory import start_heap_trimmer


def make_server(engine: LLMEngine, model_name: str, host: str, port: int, config: ServerConfig) -> uvicorn.Server:
    app = create_app(engine, model_name, config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=config.shutdown_timeout_s))
    app.state.runtime.on_death = lambda: setattr(server, "should_exit", True)
    return server


def run_server(server: uvicorn.Server) -> int:
    """Serve until SIGTERM/SIGINT (exit status 0) or until the engine dies (exit status 1)."""
    state = server.config.app.state
    runtime = state.runtime
    stopped = threading.Event()
    start_heap_trimmer(state.config.heap_trim_interval_s, stopped)
    try:
        if runtime.alive:
            server.run()
    finally:
        stopped.set()
    return 0 if runtime.failure is None else 1
