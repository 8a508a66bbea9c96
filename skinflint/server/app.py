"""The ASGI application: OpenAI routes, admin API, and the one handler that renders errors.

Hand-written rather than built on a framework because the gateway's whole per-request budget is
well under a millisecond, and routing a dozen fixed paths needs no more than a dict.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from skinflint.config import Settings, hash_key
from skinflint.errors import (
    AuthenticationError,
    BodyTooLargeError,
    RequestError,
    ShuttingDownError,
    SkinflintError,
)
from skinflint.gateway import Gateway
from skinflint.models import CLIENT_LEFT
from skinflint.monitor import event_json
from skinflint.pipeline import Reply, RequestContext
from skinflint.server.batch_map import answer_batch_map
from skinflint.server.batches_api import BatchesAPI, path_id
from skinflint.server.dashboard import PAGE, STATIC, Dashboard
from skinflint.server.model_list import ModelList
from skinflint.server.openapi import openapi_json
from skinflint.server.responses import Responder, skinflint_headers
from skinflint.server.spend_api import recent_json, requests_limit, spend_json, spend_query
from skinflint.storage.opener import NotStoredError

__all__ = ["App"]

#: How many alerts ``GET /api/alerts`` lists, newest first.
ALERTS_LISTED = 200

log = logging.getLogger("skinflint.server")

#: How long stopping waits for the requests it cancelled to answer and record their rows.
CANCELLED_GRACE = 5.0

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[["App", Scope, Receive, Responder], Awaitable[None]]


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise BodyTooLargeError(f"request body exceeds {limit} bytes")
        parts.append(body)
        if not message.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _bearer(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


class App:
    """``App(settings)`` is an ASGI 3 application; services open in the lifespan startup."""

    def __init__(self, settings: Settings, *, gateway: Gateway | None = None) -> None:
        self.settings = settings
        self.gateway: Gateway | None = gateway
        self._owns_gateway = gateway is None
        self._admin_hash = settings.admin_key_sha256
        self._key_hashes = frozenset(k.key_sha256 for k in settings.keys)
        self._model_list: ModelList | None = None
        self._dashboard = Dashboard(admin_key_required=bool(self._admin_hash))
        #: Why start-up failed, when the configuration is at fault (e.g. its database is down).
        self.startup_error: SkinflintError | None = None
        self._running: set[asyncio.Task[Any]] = set()  # pipeline requests not yet answered
        self._batches: BatchesAPI | None = None
        self._stopped = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.gateway is None:
                    try:
                        self.gateway = await Gateway.open(self.settings)
                    except SkinflintError as exc:
                        self.startup_error = exc
                        await send({"type": "lifespan.startup.failed", "message": exc.message})
                        return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def stop(self, *, cancel: bool = False) -> None:
        """Close the gateway once the requests still running have answered and recorded their
        ledger rows; with ``cancel``, cancel them first (each answers 503 ``shutdown``). The
        server calls it at shutdown, after its graceful period; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if cancel:
            for task in self._running:
                task.cancel()
        if self._running:  # cancelled by the server: they are unwinding
            await asyncio.wait(set(self._running), timeout=CANCELLED_GRACE)
        if self.gateway is not None and self._owns_gateway:
            await self.gateway.close()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = _ROUTES.get((scope["method"], scope["path"])) or _with_id(
            scope["method"], scope["path"])
        out = Responder(send)
        if handler is None:
            status = 405 if any(p == scope["path"] for _, p in _ROUTES) else 404
            await out.error(
                RequestError(f"no route for {scope['method']} {scope['path']}", code="not_found"),
                status=status,
            )
            return
        try:
            await handler(self, scope, receive, out)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # we cancelled ourselves because the client left, or the server
            if not out.client_gone:  # stops (a second Ctrl-C, the graceful period is over)
                await out.error(ShuttingDownError("the gateway is shutting down; retry"))
        except _ClientGone:
            pass
        except SkinflintError as exc:
            await out.error(exc)
        except Exception:  # the one outer handler: a bug must still answer the client
            log.exception("unhandled error")
            await out.error(SkinflintError("internal error"))

    @staticmethod
    async def _watch_disconnect(receive: Receive, out: Responder, task: asyncio.Task[Any]) -> None:
        """Cancel the request when its client disconnects, which cancels the upstream call."""
        message = await receive()
        if message["type"] == "http.disconnect" and not out.finished:
            out.client_gone = True
            task.cancel(msg=CLIENT_LEFT)

    def _require_admin(self, headers: dict[str, str]) -> None:
        if not self._admin_hash:
            return
        token = _bearer(headers)
        if not token or not hmac.compare_digest(hash_key(token), self._admin_hash):
            raise AuthenticationError("admin key required")

    def _require_gateway_key(self, headers: dict[str, str]) -> None:
        """What the attribute stage checks on the pipeline's routes, for the others."""
        if not self._key_hashes:
            return
        token = _bearer(headers)
        if not token or hash_key(token) not in self._key_hashes:
            raise AuthenticationError("invalid or missing gateway key")

    def _batches_api(self) -> BatchesAPI:
        gw = self.gateway
        assert gw is not None
        if gw.batches is None:
            raise RequestError("this gateway keeps no jobs", code="not_found")
        if self._batches is None:
            tenants = {k.key_sha256: k.tenant for k in self.settings.keys}
            self._batches = BatchesAPI(gw.batches, tenants, gw.batch_target, gw.budgets)
        return self._batches

    # ---- jobs, files and batches (see skinflint.server.batches_api)

    async def job(self, scope: Scope, receive: Receive, out: Responder) -> None:
        job_id = path_id(scope["path"], "/v1/skinflint/jobs/")
        assert job_id is not None  # routed by _with_id
        await out.json(await self._batches_api().job(_headers(scope), job_id))

    async def upload_file(self, scope: Scope, receive: Receive, out: Responder) -> None:
        raw = await _read_body(receive, self.settings.server.max_body_bytes)
        await out.json(await self._batches_api().upload(_headers(scope), raw))

    async def file(self, scope: Scope, receive: Receive, out: Responder) -> None:
        file_id = path_id(scope["path"], "/v1/files/")
        assert file_id is not None
        await out.json(await self._batches_api().file(_headers(scope), file_id))

    async def list_files(self, scope: Scope, receive: Receive, out: Responder) -> None:
        query = scope.get("query_string", b"")
        await out.json(await self._batches_api().list_files(_headers(scope), query))

    async def delete_file(self, scope: Scope, receive: Receive, out: Responder) -> None:
        file_id = path_id(scope["path"], "/v1/files/")
        assert file_id is not None
        await out.json(await self._batches_api().delete_file(_headers(scope), file_id))

    async def file_content(self, scope: Scope, receive: Receive, out: Responder) -> None:
        file_id = path_id(scope["path"], "/v1/files/", "/content")
        assert file_id is not None
        content = await self._batches_api().content(_headers(scope), file_id)
        await out.send_bytes(content, 200, [(b"content-type", b"application/octet-stream"),
                                            (b"content-length", str(len(content)).encode())])

    async def list_batches(self, scope: Scope, receive: Receive, out: Responder) -> None:
        query = scope.get("query_string", b"")
        await out.json(await self._batches_api().list_batches(_headers(scope), query))

    async def create_batch(self, scope: Scope, receive: Receive, out: Responder) -> None:
        raw = await _read_body(receive, self.settings.server.max_body_bytes)
        await out.json(await self._batches_api().create(_headers(scope), raw))

    async def batch(self, scope: Scope, receive: Receive, out: Responder) -> None:
        batch_id = path_id(scope["path"], "/v1/batches/")
        assert batch_id is not None
        await out.json(await self._batches_api().retrieve(_headers(scope), batch_id))

    async def cancel_batch(self, scope: Scope, receive: Receive, out: Responder) -> None:
        batch_id = path_id(scope["path"], "/v1/batches/", "/cancel")
        assert batch_id is not None
        await out.json(await self._batches_api().cancel(_headers(scope), batch_id))

    # ---- routes

    async def completions(self, scope: Scope, receive: Receive, out: Responder) -> None:
        await self._pipeline("chat", scope, receive, out)

    async def embeddings(self, scope: Scope, receive: Receive, out: Responder) -> None:
        await self._pipeline("embeddings", scope, receive, out)

    async def _pipeline(
        self, endpoint: str, scope: Scope, receive: Receive, out: Responder
    ) -> None:
        assert self.gateway is not None
        headers = _headers(scope)
        limit = self.settings.server.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLargeError(f"request body exceeds {limit} bytes")
        raw = await _read_body(receive, limit)
        ctx = self.gateway.context(endpoint, raw, headers)
        out.request_id = ctx.request_id
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(self._watch_disconnect(receive, out, task))
        self._running.add(task)
        try:
            reply = await self.gateway.pipeline.handle(ctx)
            await self._reply(ctx, reply, out)
        except SkinflintError as exc:
            await out.error(exc, headers=skinflint_headers(ctx))
        finally:
            self._running.discard(task)
            watcher.cancel()

    async def batch_map(self, scope: Scope, receive: Receive, out: Responder) -> None:
        """In-prompt batching: each packed call goes through the pipeline."""
        assert self.gateway is not None
        headers = _headers(scope)
        raw = await _read_body(receive, self.settings.server.max_body_bytes)
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(self._watch_disconnect(receive, out, task))
        self._running.add(task)
        try:
            await out.json(await answer_batch_map(self.gateway, raw, headers))
        finally:
            self._running.discard(task)
            watcher.cancel()

    async def _reply(self, ctx: RequestContext, reply: Reply, out: Responder) -> None:
        if reply.chunks is None:
            body = reply.raw if reply.raw is not None else orjson.dumps(reply.body)
            await out.json(body, reply.status, skinflint_headers(ctx))
        else:
            await out.sse(reply.chunks, skinflint_headers(ctx, streaming=True))

    async def models(self, scope: Scope, receive: Receive, out: Responder) -> None:
        assert self.gateway is not None
        self._require_gateway_key(_headers(scope))
        if self._model_list is None:
            self._model_list = ModelList(self.settings, self.gateway.providers)
        data = await self._model_list.data()
        await out.json(orjson.dumps({"object": "list", "data": data}))

    @property
    def ready(self) -> bool:
        """True once background loading (price catalog, embedder, recorded data) is done."""
        warmed = self.gateway.warmed if self.gateway is not None else None
        return warmed is not None and warmed.done()

    async def health(self, scope: Scope, receive: Receive, out: Responder) -> None:
        await out.json(orjson.dumps({"status": "ok", "ready": self.ready}))

    async def openapi(self, scope: Scope, receive: Receive, out: Responder) -> None:
        await out.json(openapi_json())

    async def dashboard(self, scope: Scope, receive: Receive, out: Responder) -> None:
        """The dashboard page and its files. They hold no data, so they need no key: the page
        sends the admin key on its requests for data (see :mod:`skinflint.server.dashboard`)."""
        path: str = scope["path"]
        name = PAGE if path == "/dashboard" else path.rpartition("/")[2]
        asset = await self._dashboard.asset(name)
        status, headers, body = self._dashboard.response(asset, name, _headers(scope))
        await out.send_bytes(body, status, headers)

    async def metrics(self, scope: Scope, receive: Receive, out: Responder) -> None:
        assert self.gateway is not None
        self._require_admin(_headers(scope))
        if self.gateway.budgets is not None:
            self.gateway.metrics.show_budgets(await self.gateway.budgets.rows())
        await out.send_bytes(
            self.gateway.metrics.render(),
            200,
            [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
        )

    async def budgets(self, scope: Scope, receive: Receive, out: Responder) -> None:
        """Each budget's current window per subject: limit, spent, reserved, remaining."""
        assert self.gateway is not None
        self._require_admin(_headers(scope))
        book = self.gateway.budgets
        rows = await book.rows() if book is not None else []
        await out.json(orjson.dumps({"object": "list", "data": rows}))

    async def alerts(self, scope: Scope, receive: Receive, out: Responder) -> None:
        """The newest cost alerts, firing or resolved, and how many fire."""
        assert self.gateway is not None
        self._require_admin(_headers(scope))
        gw = self.gateway
        store = gw.alerts.store if gw.alerts is not None else None
        if store is None and gw.shadow is not None:  # the shadow guard's switches
            store = gw.shadow.alert_store
        data, active = [], 0
        if store is not None:
            data = [event_json(e) for e in await store.recent(ALERTS_LISTED)]
            active = sum((await store.active()).values())
        await out.json(orjson.dumps({"data": data, "active": active}))

    async def shadow(self, scope: Scope, receive: Receive, out: Responder) -> None:
        """The shadow guard's score per feature and strategy, and whether it is on."""
        assert self.gateway is not None
        self._require_admin(_headers(scope))
        guard = self.gateway.shadow
        rows = guard.rows() if guard is not None else []
        dropped = guard.dropped if guard is not None else 0
        await out.json(orjson.dumps({"object": "list", "data": rows, "dropped": dropped}))

    async def shadow_enable(self, scope: Scope, receive: Receive, out: Responder) -> None:
        """Switch a strategy the shadow guard switched off back on for a feature."""
        assert self.gateway is not None
        self._require_admin(_headers(scope))
        raw = await _read_body(receive, self.settings.server.max_body_bytes)
        try:
            asked = orjson.loads(raw)
        except orjson.JSONDecodeError:
            asked = None
        if not isinstance(asked, dict) or not all(
                isinstance(asked.get(k), str) for k in ("feature", "strategy")):
            raise RequestError('body must be {"feature": "...", "strategy": "..."}',
                               code="invalid_shadow_switch")
        guard = self.gateway.shadow
        if guard is None:
            raise RequestError("no feature is shadowed (compression.<scope>.shadow)",
                               code="not_found")
        feature, strategy = asked["feature"], asked["strategy"]
        was_off = await guard.enable(feature, strategy)
        await out.json(orjson.dumps({"feature": feature, "strategy": strategy,
                                     "state": "on", "switched_on": was_off}))

    async def spend(self, scope: Scope, receive: Receive, out: Responder) -> None:
        """Spend by feature, model, user, tenant or strategy, from the ledger's rollups."""
        assert self.gateway is not None
        self._require_admin(_headers(scope))
        query = spend_query(scope.get("query_string", b""))
        now = time.time()
        try:
            spend = await self.gateway.storage.spend(
                query.by, now - query.seconds, now, query.bucket)
        except NotStoredError as exc:
            raise RequestError(str(exc), code="not_found") from None
        await out.json(orjson.dumps(spend_json(spend)))

    async def recent_requests(self, scope: Scope, receive: Receive, out: Responder) -> None:
        """The newest ledger rows, newest first."""
        assert self.gateway is not None
        self._require_admin(_headers(scope))
        limit = requests_limit(scope.get("query_string", b""))
        try:
            rows = await self.gateway.storage.recent(limit)
        except NotStoredError as exc:
            raise RequestError(str(exc), code="not_found") from None
        await out.json(orjson.dumps(recent_json(rows)))

    async def invalidate(self, scope: Scope, receive: Receive, out: Responder) -> None:
        assert self.gateway is not None
        self._require_admin(_headers(scope))
        raw = await _read_body(receive, self.settings.server.max_body_bytes)
        try:
            tags = orjson.loads(raw).get("tags")
        except (orjson.JSONDecodeError, AttributeError):
            tags = None
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RequestError('body must be {"tags": ["tag", ...]}', code="invalid_tags")
        dropped = await self.gateway.cache.invalidate_tags(tags)
        await out.json(orjson.dumps({"invalidated": dropped, "tags": tags}))


_ROUTES: dict[tuple[str, str], Handler] = {}
for _path in ("/v1/chat/completions", "/chat/completions"):
    _ROUTES["POST", _path] = App.completions
for _path in ("/v1/embeddings", "/embeddings"):
    _ROUTES["POST", _path] = App.embeddings
for _path in ("/v1/models", "/models"):
    _ROUTES["GET", _path] = App.models
_ROUTES["POST", "/v1/skinflint/batch_map"] = App.batch_map
_ROUTES["GET", "/health"] = App.health
_ROUTES["GET", "/dashboard"] = App.dashboard
for _name in STATIC:
    _ROUTES["GET", f"/dashboard/static/{_name}"] = App.dashboard
_ROUTES["GET", "/metrics"] = App.metrics
_ROUTES["GET", "/openapi.json"] = App.openapi
_ROUTES["POST", "/api/cache/invalidate"] = App.invalidate
_ROUTES["GET", "/api/budgets"] = App.budgets
_ROUTES["GET", "/api/alerts"] = App.alerts
_ROUTES["GET", "/api/shadow"] = App.shadow
_ROUTES["POST", "/api/shadow/enable"] = App.shadow_enable
_ROUTES["GET", "/api/spend"] = App.spend
_ROUTES["GET", "/api/requests"] = App.recent_requests
_ROUTES["POST", "/v1/files"] = App.upload_file
_ROUTES["GET", "/v1/files"] = App.list_files
_ROUTES["POST", "/v1/batches"] = App.create_batch
_ROUTES["GET", "/v1/batches"] = App.list_batches

#: Routes whose path ends in an id: (method, prefix, suffix).
_ID_ROUTES: list[tuple[str, str, str, Handler]] = [
    ("GET", "/v1/skinflint/jobs/", "", App.job),
    ("GET", "/v1/files/", "/content", App.file_content),
    ("GET", "/v1/files/", "", App.file),
    ("DELETE", "/v1/files/", "", App.delete_file),
    ("POST", "/v1/batches/", "/cancel", App.cancel_batch),
    ("GET", "/v1/batches/", "", App.batch),
]


def _with_id(method: str, path: str) -> Handler | None:
    for m, prefix, suffix, handler in _ID_ROUTES:
        if m == method and path_id(path, prefix, suffix) is not None:
            return handler
    return None
