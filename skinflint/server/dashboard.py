"""The dashboard: one static page and its files, shipped in the package (no build step, no CDN,
so it works offline).

``GET /dashboard`` answers ``index.html``; ``GET /dashboard/static/<name>`` answers one of
:data:`STATIC` (the page's script and style sheet, and Chart.js) and nothing else. The names
are a fixed list known at start, so no part of a client's path ever reaches the file system.

The files hold no data, so they are served without a key; the data comes from the admin API
(``/api/spend``, ``/api/requests``, ``/api/alerts``, ``/api/budgets``, ``/metrics``), which
checks the admin key when one is configured. The key is never put in a URL, where it would end
up in access logs, browser history and ``Referer`` headers. Instead, when the gateway has an
admin key, the page says so (``<meta name="skinflint-admin-key" content="required">``), asks
for the key once in a form, keeps it in the tab's ``sessionStorage`` (dropped when the tab
closes) and sends it as ``Authorization: Bearer <key>`` on its own requests. Scripts, styles
and connections are limited to the gateway itself by the page's Content-Security-Policy.

Files are read once, in a thread, on the first request for any of them, and kept in memory
(about 230 kB, and about 80 kB gzipped for clients that accept it). Every answer carries an
``ETag`` and ``Cache-Control: no-cache``: browsers keep the files but ask again on each load,
and get a body-less 304 while the gateway has not been upgraded.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from dataclasses import dataclass
from importlib.resources import files

__all__ = ["PAGE", "STATIC", "Asset", "Dashboard"]

Headers = list[tuple[bytes, bytes]]

#: The page itself, answered at ``GET /dashboard``.
PAGE = "index.html"

#: The files answered at ``GET /dashboard/static/<name>``, with their content types.
STATIC: dict[str, bytes] = {
    "dashboard.js": b"text/javascript; charset=utf-8",
    "dashboard.css": b"text/css; charset=utf-8",
    "chart.umd.min.js": b"text/javascript; charset=utf-8",
}

_TYPES = {PAGE: b"text/html; charset=utf-8", **STATIC}

#: What the page may load and connect to: the gateway, nothing else. Chart.js styles its
#: canvases through the DOM, which ``style-src`` does not restrict.
_PAGE_SECURITY: Headers = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_ADMIN_META = b'<meta name="skinflint-admin-key" content="optional">'


@dataclass(frozen=True, slots=True)
class Asset:
    """One file as served: its bytes, gzipped bytes, entity tag and content type."""

    body: bytes
    gzipped: bytes
    etag: bytes
    content_type: bytes

    @classmethod
    def of(cls, body: bytes, content_type: bytes) -> Asset:
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        return cls(body, gzip.compress(body, 6, mtime=0), etag, content_type)


def _read(admin_key_required: bool) -> dict[str, Asset]:
    folder = files("skinflint") / "dashboard"
    assets = {name: Asset.of((folder / name).read_bytes(), kind) for name, kind in _TYPES.items()}
    if admin_key_required:
        page = assets[PAGE].body.replace(
            _ADMIN_META, _ADMIN_META.replace(b"optional", b"required"))
        assets[PAGE] = Asset.of(page, _TYPES[PAGE])
    return assets


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in {"q=0", "q=0.0", "q=0.00", "q=0.000"}
    return False


class Dashboard:
    """The dashboard's files for one gateway. ``admin_key_required`` marks the page so that it
    asks for the admin key before fetching data."""

    def __init__(self, *, admin_key_required: bool) -> None:
        self._admin_key_required = admin_key_required
        self._assets: dict[str, Asset] | None = None

    async def asset(self, name: str) -> Asset:
        """The file ``name`` (:data:`PAGE` or a key of :data:`STATIC`)."""
        if self._assets is None:  # two first requests at once both read: harmless
            self._assets = await asyncio.to_thread(_read, self._admin_key_required)
        return self._assets[name]

    @staticmethod
    def response(
        asset: Asset, name: str, request: dict[str, str]
    ) -> tuple[int, Headers, bytes]:
        """Status, headers and body answering ``request`` (its lower-cased headers) with
        ``asset``: 304 when the client's copy is current, gzipped when it accepts that."""
        headers: Headers = [
            (b"etag", asset.etag),
            (b"cache-control", b"no-cache"),
            (b"x-content-type-options", b"nosniff"),
        ]
        if name == PAGE:
            headers += _PAGE_SECURITY
        tags = {t.strip().removeprefix("W/") for t in request.get("if-none-match", "").split(",")}
        if asset.etag.decode() in tags or "*" in tags:
            return 304, headers, b""
        body = asset.body
        headers += [(b"content-type", asset.content_type), (b"vary", b"accept-encoding")]
        if _accepts_gzip(request.get("accept-encoding", "")):
            body = asset.gzipped
            headers.append((b"content-encoding", b"gzip"))
        headers.append((b"content-length", str(len(body)).encode()))
        return 200, headers, body
