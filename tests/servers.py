"""Real HTTP servers for tests: an ASGI app served by uvicorn on 127.0.0.1 in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def run_app(app, *, startup_timeout_s: float = 30.0, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1 and yield its base URL, e.g. ``http://127.0.0.1:41234``.

    The app's lifespan runs, so startup and shutdown code is exercised. The socket is bound before the
    server starts, so the port cannot be taken in between. Raises RuntimeError when the server does not
    start within ``startup_timeout_s`` seconds (the uvicorn log above gives the cause).
    """
    # IPPROTO_TCP rather than the default 0, because asyncio turns on TCP_NODELAY only for sockets of that
    # proto (base_events._set_nodelay in CPython 3.11). Without it each response body waits about 40 ms for
    # the client's delayed ACK of the headers.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()

    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"uvicorn on 127.0.0.1:{port} stopped during startup; see its log above.")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn on 127.0.0.1:{port} did not start within {startup_timeout_s} s.")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=startup_timeout_s)
        sock.close()
