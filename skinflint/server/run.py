"""Running the application under uvicorn (uvloop + httptools, chosen by measurement: see
``bench/README.md``)."""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from skinflint.config import Settings, load_settings
from skinflint.server.app import App

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "GC_THRESHOLDS",
    "WORKER_APP",
    "BackgroundServer",
    "configure_process",
    "create_app",
    "listen_url",
    "serve",
]

#: Collect cyclic garbage less often. Requests create few cycles, while every full collection
#: walks the whole cache: with the defaults, pass-through p99 at 16 clients was 57-65 ms; with
#: these, 7-10 ms at the same throughput and CPU (measured with wrk on 2 cores).
GC_THRESHOLDS = (50_000, 50, 100)

#: What each worker process of ``serve(workers=N)`` imports and calls to build its application.
WORKER_APP = "skinflint.server.run:create_app"

_UVICORN_OPTIONS: dict[str, Any] = dict(
    loop="uvloop",
    http="httptools",
    lifespan="on",
    access_log=False,
    log_level="warning",
    timeout_graceful_shutdown=30,
    server_header=False,
)


def configure_process() -> None:
    """Settings of the whole process that serving needs: run by the process that serves, and
    by each worker process of a multi-worker server (which starts a fresh interpreter)."""
    gc.set_threshold(*GC_THRESHOLDS)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def create_app() -> App:
    """Factory for multi-worker mode: each worker sets itself up and loads the configuration
    (``$SKINFLINT_CONFIG``) itself."""
    configure_process()
    return App(load_settings())


def listen_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    workers: int = 1,
    on_listening: Callable[[str], None] | None = None,
) -> bool:
    """Serve until stopped; False if the application failed to start, or the configuration's
    SkinflintError (e.g. an unreachable database) when that is why. ``on_listening(url)``
    is called once requests are served (with several workers, once the address is bound),
    with the port the system chose for port 0. A port in use raises OSError before that.
    Several workers are separate processes, each built by :data:`WORKER_APP`."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, not {port}")
    if workers > 1 and port == 0:
        raise ValueError("port 0 (any free port) needs a single worker: give a port")
    configure_process()
    sock = _bind(host, port)
    url = listen_url(host, sock.getsockname()[1])
    if workers > 1:
        sock.close()  # the workers' supervisor binds it again (SO_REUSEADDR) and shares it
        if on_listening:
            on_listening(url)
        uvicorn.run(WORKER_APP, factory=True, workers=workers, host=host, port=port,
                    **_UVICORN_OPTIONS)
        return True

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_listening:
                on_listening(url)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            if self.force_exit:  # a second Ctrl-C: uvicorn neither cancels nor shuts down
                await app.stop(cancel=True)  # the requests answer 503, the ledger is written

    app = App(settings)
    server = Server(uvicorn.Config(app, **_UVICORN_OPTIONS))
    # a start-up error of the configuration is raised below for the caller to report once
    quiet = _WhileFailed(app)
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's exit on a failed start-up (some versions)
        if app.startup_error is None:
            raise
    finally:
        sock.close()
        logging.getLogger("uvicorn.error").removeFilter(quiet)
    if app.startup_error is not None:
        raise app.startup_error
    return server.started


class _WhileFailed(logging.Filter):
    """Drops uvicorn's own lines about a start-up that the application reported as failed."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return self.app.startup_error is None


class BackgroundServer:
    """The gateway on a loopback port in a thread of this process, for the demo and tests;
    entering waits until background loading (prices, embedder, recorded data) is done.

    ``with BackgroundServer(settings) as srv: srv.base_url`` -> ``http://127.0.0.1:PORT/v1``.
    ``server_class`` runs a subclass of ``uvicorn.Server`` instead of uvicorn's own."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        server_class: type[uvicorn.Server] | None = None,
    ) -> None:
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
        self._server = (server_class or uvicorn.Server)(config)
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
