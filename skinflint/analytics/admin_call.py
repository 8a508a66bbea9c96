"""Asking a running gateway to act through its admin API, for the commands that can
(``cache invalidate --url``, ``shadow enable --url``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["GatewayRefused", "post_admin"]


class GatewayRefused(Exception):
    """The gateway did not do it; the message says why, in words fit for a user."""


def post_admin(url: str, path: str, payload: dict[str, Any], admin_key: str | None, *,
               timeout: float) -> dict[str, Any]:
    """POST ``payload`` as JSON to ``path`` of the gateway at ``url``; its JSON answer."""
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(payload).encode(),
                                 method="POST", headers={"content-type": "application/json"})
    if admin_key:
        req.add_header("authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise GatewayRefused("it needs its admin key (--admin-key)") from None
        raise GatewayRefused(f"it answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise GatewayRefused(f"it did not answer ({getattr(exc, 'reason', exc)})") from None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise GatewayRefused("its answer was not a skinflint gateway's")
    return answer
