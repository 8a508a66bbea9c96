"""Running the application under uvicorn (uvloop + httptools, chosen by measurement: see
``bench/README.md``)."""

from __future__ import annotations

import logging

from skinflint.config import Settings, load_settings
from skinflint.server.app import App

__all__ = ["create_app", "serve"]


def create_app() -> App:
    """Factory for multi-worker mode: each worker loads the configuration itself."""
    return App(load_settings())


def serve(settings: Settings, *, host: str, port: int, workers: int = 1) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    common: dict[str, object] = dict(host=host, port=port, loop="uvloop", http="httptools",
                                     lifespan="on", access_log=False, log_level="warning",
                                     timeout_graceful_shutdown=30, server_header=False)
    if workers > 1:
        uvicorn.run("skinflint.server.run:create_app", factory=True, workers=workers, **common)  # type: ignore[arg-type]
    else:
        uvicorn.run(App(settings), **common)  # type: ignore[arg-type]
