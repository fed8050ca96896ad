"""Running an ASGI app as a real HTTP server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import uvicorn

from shared.errors import ConfigError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def running_server(app, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread and yield its base URL; ``port=0`` picks a free port.

    The server is stopped, and its thread joined, when the ``with`` block ends, even on an error.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{host}:{port}", daemon=True)
    thread.start()

    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise ConfigError(f"server on {host}:{port} failed to start; see the log above for the cause.")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"server on {host}:{port} did not start within {startup_timeout:.0f} s.")
        time.sleep(0.05)

    bound_port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://{host}:{bound_port}"
    logger.info("server listening on %s", base_url)
    try:
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
