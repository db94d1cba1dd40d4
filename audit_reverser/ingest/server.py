"""The audit webhook receiver: ``POST /audit-webhook[/{cluster}]``, ``/healthz``, ``/readyz``.

Handlers stay thin: check the request, decode with orjson, triage, queue, answer. A bad
request gets a 4xx with a JSON ``error`` that says what is wrong; the server stays up.
Background work (writers, the intake worker) starts and stops through ``cleanup_ctx``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import orjson
from aiohttp import web

from audit_reverser.events import AUDIT_API_VERSIONS
from audit_reverser.ingest.intake import Intake

log = logging.getLogger(__name__)

# Above the apiserver's own cap on one webhook batch body, so real batches always fit.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


class Receiver(Protocol):
    """What the HTTP layer needs from the running pipeline."""

    @property
    def intake(self) -> Intake: ...

    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


RECEIVER = web.AppKey("receiver", Receiver)


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=orjson.dumps({"error": message}).decode(), content_type="application/json")


async def audit_webhook(request: web.Request) -> web.Response:
    cluster = request.match_info.get("cluster", "")
    if cluster and not _CLUSTER_NAME.match(cluster):
        raise _error(web.HTTPBadRequest, f"invalid cluster name {cluster!r}")
    if request.content_type != "application/json":
        raise _error(
            web.HTTPUnsupportedMediaType,
            f"Content-Type must be application/json, got {request.content_type!r}",
        )
    receiver = request.app[RECEIVER]
    if not receiver.ready():
        raise web.HTTPServiceUnavailable(headers={"Retry-After": "5"}, text="not ready")
    body = await request.read()
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _error(web.HTTPBadRequest, f"body is not valid JSON: {exc}") from exc
    if not isinstance(document, Mapping):
        raise _error(web.HTTPBadRequest, "body must be a JSON object (an audit EventList)")
    if document.get("kind") != "EventList" or document.get("apiVersion") not in AUDIT_API_VERSIONS:
        raise _error(
            web.HTTPBadRequest,
            "body must be an EventList of apiVersion audit.k8s.io/v1, got "
            f"kind={document.get('kind')!r} apiVersion={document.get('apiVersion')!r}",
        )
    items = document.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise _error(web.HTTPBadRequest, "EventList.items must be a list")
    intake = receiver.intake
    triage = intake.triage(items, cluster=cluster, source=request.remote or "")
    await intake.submit(triage.kept)
    return web.json_response(triage.as_json())


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    if request.app[RECEIVER].ready():
        return web.Response(text="ok")
    return web.Response(status=503, text="not ready")


def make_app(
    receiver: Receiver, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app[RECEIVER] = receiver

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await receiver.start()
        yield
        await receiver.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/audit-webhook", audit_webhook)
    app.router.add_post("/audit-webhook/{cluster}", audit_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
