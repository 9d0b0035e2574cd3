"""Start a generation server in this process: uvicorn in a thread on a free 127.0.0.1 port.

    with serve(app) as base_url:                 # "http://127.0.0.1:PORT"
        httpx.get(base_url + "/health")

Startup and shutdown are bounded in time (``timeout``); the thread is joined on exit.
"""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn

from tests.distributed_harness import free_port


@contextlib.contextmanager
def serve(app, timeout: float = 30.0):
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
