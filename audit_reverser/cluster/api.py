"""The kubernetes-asyncio adapter: one client, GETs with retries, errors in our own terms.

Credentials come from ``--kubeconfig`` or, inside a pod, from the service account
(in-cluster config). A read is retried with capped, jittered back-off when the API answers
429 or 5xx or cannot be reached; a 404 is an answer (the object does not exist), not an
error. After the last try the read fails with :class:`ApiUnavailable` (temporary: the event
stays in the journal).

kubernetes-asyncio is imported when a client is made, not with this module: its generated
API and model classes take about 37 MiB and 0.4 s to import, which a receiver with rules
from files (``--config``, the embedded default) never uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from audit_reverser.errors import ConfigError, TemporaryError

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient
    from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

ATTEMPTS = 5
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
REQUEST_TIMEOUT_S = 30.0
WATCH_TIMEOUT_S = 300


class ApiUnavailable(TemporaryError):
    """The Kubernetes API did not answer usefully after several tries."""


class WatchExpired(Exception):
    """The resourceVersion a watch started from is gone (410): list again."""


def _load_kubernetes_asyncio() -> None:
    """Import the client off the event loop (an import reads files)."""
    import kubernetes_asyncio.client
    import kubernetes_asyncio.config  # noqa: F401  # loaded for the caller


def _api_exception() -> type[ApiException]:
    """kubernetes-asyncio's error for an HTTP answer (loaded by then: a client exists)."""
    from kubernetes_asyncio.client.exceptions import ApiException

    return ApiException


class KubeApi:
    def __init__(self, client: ApiClient, server: str) -> None:
        self._client = client
        self.server = server
        self.requests = 0

    @classmethod
    async def connect(cls, kubeconfig: Path | None) -> KubeApi:
        """A client from ``kubeconfig``, or from the pod's service account when None."""
        await asyncio.to_thread(_load_kubernetes_asyncio)
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import ApiClient, Configuration
        from kubernetes_asyncio.config.config_exception import ConfigException

        configuration = Configuration()
        try:
            if kubeconfig is not None:
                await config.load_kube_config(
                    config_file=str(kubeconfig), client_configuration=configuration
                )
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
            else:
                raise ConfigError(
                    ["cluster mode needs --kubeconfig, or to run in a pod with a service account"]
                )
        except (ConfigException, OSError) as exc:
            where = kubeconfig if kubeconfig is not None else "in-cluster config"
            raise ConfigError([f"{where}: {exc}"]) from None
        return cls(ApiClient(configuration), str(configuration.host))

    @classmethod
    async def from_dict(cls, kubeconfig: dict[str, Any]) -> KubeApi:
        await asyncio.to_thread(_load_kubernetes_asyncio)
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import ApiClient, Configuration

        configuration = Configuration()
        await config.load_kube_config_from_dict(kubeconfig, client_configuration=configuration)
        return cls(ApiClient(configuration), str(configuration.host))

    async def close(self) -> None:
        await self._client.close()

    async def get(
        self, path: str, query: list[tuple[str, str]] | None = None
    ) -> dict[str, Any] | None:
        """The JSON at ``path``; None on 404. Retries what may pass, then ApiUnavailable."""
        delay = RETRY_MIN_S
        for attempt in range(1, ATTEMPTS + 1):
            self.requests += 1
            try:
                result = await self._client.call_api(
                    path,
                    "GET",
                    query_params=query,
                    response_types_map={200: "object"},
                    auth_settings=["BearerToken"],
                    _return_http_data_only=True,
                    _request_timeout=REQUEST_TIMEOUT_S,
                )
                return result if isinstance(result, dict) else None
            except _api_exception() as exc:
                if exc.status == 404:
                    return None
                if exc.status not in (429, 500, 502, 503, 504) or attempt == ATTEMPTS:
                    raise ApiUnavailable(
                        f"GET {path} on {self.server}: {exc.status} {exc.reason}"
                    ) from None
                problem = f"{exc.status} {exc.reason}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if attempt == ATTEMPTS:
                    raise ApiUnavailable(f"GET {path} on {self.server}: {exc}") from None
                problem = str(exc) or type(exc).__name__
            log.warning("GET %s: %s; try %d of %d", path, problem, attempt + 1, ATTEMPTS)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RETRY_MAX_S)
        raise AssertionError("unreachable")

    async def patch_status(self, path: str, status: dict[str, Any]) -> bool:
        """Merge ``status`` into the status subresource at ``path``; False when the object is
        gone. One try: status is reported again on the next round anyway."""
        return await self.write("PATCH", f"{path}/status", {"status": status})

    async def write(self, method: str, path: str, body: dict[str, Any]) -> bool:
        """POST (create) or PATCH (JSON merge patch) once; False on 404 (or 409 for a POST:
        it exists). Other failures are ApiUnavailable: the caller tries again later."""
        self.requests += 1
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        try:
            await self._client.call_api(
                path,
                method,
                header_params={"Content-Type": content_type},
                body=body,
                response_types_map={200: "object", 201: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except _api_exception() as exc:
            if exc.status == 404 or (method == "POST" and exc.status == 409):
                return False
            raise ApiUnavailable(f"{method} {path}: {exc.status} {exc.reason}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiUnavailable(f"{method} {path}: {exc}") from None
        return True

    async def watch(
        self, path: str, resource_version: str, timeout_s: int = WATCH_TIMEOUT_S
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events of ``path`` after ``resource_version``, until the server ends the
        stream. :class:`WatchExpired` when that version is too old (410 Gone)."""
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_s)),
        ]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        self.requests += 1
        try:
            response = await self._client.call_api(
                path,
                "GET",
                query_params=query,
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _preload_content=False,
                # Connect quickly; a quiet stream is normal, up to the server-side timeout.
                _request_timeout=aiohttp.ClientTimeout(connect=10, sock_read=timeout_s + 30),
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiUnavailable(f"watch {path} on {self.server}: {exc}") from None
        try:
            if response.status == 410:
                raise WatchExpired(path)
            if response.status != 200:
                raise ApiUnavailable(f"watch {path} on {self.server}: {response.status}")
            async for line in response.content:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise ApiUnavailable(f"watch {path}: undecodable event") from None
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    if status.get("code") == 410:
                        raise WatchExpired(path)
                    raise ApiUnavailable(f"watch {path}: {status.get('message', status)}")
                yield event
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiUnavailable(f"watch {path} on {self.server}: {exc}") from None
        finally:
            response.release()
