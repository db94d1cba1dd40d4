"""The audit webhook receiver: ``POST /audit-webhook[/{cluster}]``, ``/healthz``, ``/readyz``.

Handlers stay thin: check the sender and the request, decode with orjson, triage, journal,
answer. Every refusal is a Kubernetes ``Status`` object (the apiserver's webhook client
reads its message into its own log) with the matching code; 429 and 503 carry
``Retry-After``, which makes the apiserver retry the batch instead of dropping it. Background
work (journal, writers, the intake worker) starts and stops through ``cleanup_ctx``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import orjson
from aiohttp import web

from audit_reverser.errors import shown
from audit_reverser.events import AUDIT_API_VERSIONS
from audit_reverser.ingest.auth import SenderPolicy, SenderRefused
from audit_reverser.ingest.intake import Intake, Overloaded
from audit_reverser.journal import JournalUnavailable
from audit_reverser.pipeline.layout import CLUSTER_NAME

log = logging.getLogger(__name__)

# Above the apiserver's own cap on one webhook batch body, so real batches always fit.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class Receiver(Protocol):
    """What the HTTP layer needs from the running pipeline."""

    @property
    def intake(self) -> Intake: ...

    def ready(self) -> bool: ...

    def readiness(self) -> list[tuple[str, bool | None, str]]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


RECEIVER = web.AppKey("receiver", Receiver)
SENDERS = web.AppKey("senders", SenderPolicy)
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)
# Why a cluster's events cannot be taken yet (a fleet's cluster whose rules are not read),
# or None: that cluster's batches get 503, the others' are taken as usual.
WAITING_FOR: web.AppKey[Callable[[str], str | None]] = web.AppKey("waiting_for")

# Seconds the apiserver should wait: a backlog drains in about a second; a full disk or a
# restart takes longer.
RETRY_AFTER_BUSY = 1
RETRY_AFTER_UNAVAILABLE = 10

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
    503: "ServiceUnavailable",
}


def refusal(code: int, message: str, *, retry_after: int | None = None) -> web.HTTPException:
    """A ``metav1.Status`` failure response, as Kubernetes clients expect to read one."""
    status: dict[str, object] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": _REASONS[code],
        "code": code,
    }
    headers = {}
    if retry_after is not None:
        status["details"] = {"retryAfterSeconds": retry_after}
        headers["Retry-After"] = str(retry_after)
    if code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    response = web.HTTPException(
        text=orjson.dumps(status).decode(), content_type="application/json", headers=headers
    )
    response.set_status(code)
    return response


async def audit_webhook(request: web.Request) -> web.Response:
    status = 500
    try:
        response = await _take_batch(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[RECEIVER].intake.stats.batches[status] += 1


async def _take_batch(request: web.Request) -> web.Response:
    cluster = request.match_info.get("cluster", "")
    try:
        request.app[SENDERS].check(
            request.headers.get("Authorization"),
            request.transport.get_extra_info("peercert") if request.transport else None,
            cluster,
        )
    except SenderRefused as exc:
        log.warning("refused audit events from %s: %s", request.remote, exc)
        raise refusal(exc.status, str(exc)) from None
    if cluster and not CLUSTER_NAME.match(cluster):
        raise refusal(400, f"invalid cluster name {shown(cluster)}")
    if request.content_type != "application/json":
        raise refusal(
            415, f"Content-Type must be application/json, got {shown(request.content_type)}"
        )
    receiver = request.app[RECEIVER]
    if not receiver.ready():
        raise refusal(503, "not ready", retry_after=RETRY_AFTER_UNAVAILABLE)
    waiting = request.app[WAITING_FOR](cluster)
    if waiting is not None:
        raise refusal(503, waiting, retry_after=RETRY_AFTER_UNAVAILABLE)
    intake = receiver.intake
    if intake.overloaded():
        raise refusal(429, "too many events wait for Git", retry_after=RETRY_AFTER_BUSY)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise refusal(
            413, f"body is larger than the limit of {request.app[MAX_BODY_BYTES]} bytes"
        ) from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise refusal(400, f"body is not valid JSON: {exc}") from exc
    if not isinstance(document, Mapping):
        raise refusal(400, "body must be a JSON object (an audit EventList)")
    if document.get("kind") != "EventList" or document.get("apiVersion") not in AUDIT_API_VERSIONS:
        raise refusal(
            400,
            "body must be an EventList of apiVersion audit.k8s.io/v1, got "
            f"kind={shown(document.get('kind'))} apiVersion={shown(document.get('apiVersion'))}",
        )
    items = document.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise refusal(400, "EventList.items must be a list")
    triage = intake.triage(items, cluster=cluster, source=request.remote or "")
    try:
        await intake.accept(triage, cluster=cluster)
    except Overloaded as exc:
        raise refusal(429, str(exc), retry_after=RETRY_AFTER_BUSY) from None
    except JournalUnavailable as exc:
        log.error("refused a batch of %d events: %s", len(triage.kept), exc)
        raise refusal(503, str(exc), retry_after=RETRY_AFTER_UNAVAILABLE) from None
    return web.json_response(triage.as_json())


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    """503 unless events can be taken; ``?verbose`` lists the checks, as the apiserver's
    own /readyz does ([+] passed, [-] failed, [!] reported only)."""
    receiver = request.app[RECEIVER]
    ready = receiver.ready()
    status = 200 if ready else 503
    if "verbose" not in request.query:
        return web.Response(status=status, text="ok" if ready else "not ready")
    lines = []
    for name, ok, detail in receiver.readiness():
        mark, word = {True: ("+", "ok"), False: ("-", "failed"), None: ("!", "warning")}[ok]
        lines.append(f"[{mark}]{name} {word}" + (f": {detail}" if detail else ""))
    lines.append(f"readyz check {'passed' if ready else 'failed'}")
    return web.Response(status=status, text="\n".join(lines) + "\n")


def make_app(
    receiver: Receiver,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    senders: SenderPolicy | None = None,
    metrics: Callable[[], bytes] | None = None,
    waiting_for: Callable[[str], str | None] | None = None,
) -> web.Application:
    """The receiver's HTTP app; ``metrics`` (Prometheus text) is served at ``/metrics``;
    ``waiting_for``: why a cluster's events cannot be taken yet (503), or None."""
    app = web.Application(client_max_size=max_body_bytes)
    app[RECEIVER] = receiver
    app[WAITING_FOR] = waiting_for or (lambda cluster: None)
    app[SENDERS] = senders or SenderPolicy()
    app[MAX_BODY_BYTES] = max_body_bytes

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await receiver.start()
        yield
        await receiver.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/audit-webhook", audit_webhook)
    app.router.add_post("/audit-webhook/{cluster}", audit_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics is not None:
        render = metrics

        async def serve_metrics(request: web.Request) -> web.Response:
            return web.Response(
                body=render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
            )

        app.router.add_get("/metrics", serve_metrics)
    return app
