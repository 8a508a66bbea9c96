"""Running the application under uvicorn (uvloop + httptools, chosen by measurement: see
``bench/README.md``)."""

from __future__ import annotations

import logging

from skinflint.config import Settings, load_settings
from skinflint.server.app import App

__all__ = ["BackgroundServer", "create_app", "serve"]


def create_app() -> App:
    """Factory for multi-worker mode: each worker loads the configuration itself."""
    return App(load_settings())


#: Collect cyclic garbage less often. Requests create few cycles, while every full collection
#: walks the whole cache: with the defaults, pass-through p99 at 16 clients was 57-65 ms; with
#: these, 7-10 ms at the same throughput and CPU (measured with wrk on 2 cores).
GC_THRESHOLDS = (50_000, 50, 100)


def serve(settings: Settings, *, host: str, port: int, workers: int = 1) -> None:
    import gc

    import uvicorn

    gc.set_threshold(*GC_THRESHOLDS)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    common: dict[str, object] = dict(
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    if workers > 1:
        uvicorn.run("skinflint.server.run:create_app", factory=True, workers=workers, **common)  # type: ignore[arg-type]
    else:
        uvicorn.run(App(settings), **common)  # type: ignore[arg-type]


class BackgroundServer:
    """The gateway on a loopback port in a thread of this process, for the demo and tests;
    entering waits until background loading (prices, embedder, recorded data) is done.

    ``with BackgroundServer(settings) as srv: srv.base_url`` -> ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, settings: Settings, *, host: str = "127.0.0.1") -> None:
        import socket
        import threading

        import uvicorn

        self.app = App(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.port: int = self._sock.getsockname()[1]
        self.root_url = f"http://{host}:{self.port}"
        self.base_url = self.root_url + "/v1"
        config = uvicorn.Config(
            self.app,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level="warning",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="skinflint-server",
            daemon=True,
        )

    def __enter__(self) -> BackgroundServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not (self._server.started and self.app.ready):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
