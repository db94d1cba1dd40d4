"""The ``audit-reverser`` command: ``serve`` (webhook receiver), ``replay`` (audit logs) and
``check`` (can every GitProvider be pushed to).

User mistakes end in one clear line per problem on stderr and a non-zero exit, never a
traceback; a traceback means a bug in audit-reverser.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import gc
import ipaddress
import json
import logging
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from aiohttp import web

from audit_reverser import __version__
from audit_reverser.cluster.api import KubeApi
from audit_reverser.cluster.fleet import FleetRules, FolderFleet
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.cluster.resync import DEFAULT_INTERVAL_S as DEFAULT_RESYNC_INTERVAL_S
from audit_reverser.cluster.resync import Resyncer, ResyncResult, ResyncStats
from audit_reverser.cluster.rules import ClusterRules
from audit_reverser.cluster.snapshot import SnapshotResult, SnapshotScheduler
from audit_reverser.cluster.status import StatusReporter
from audit_reverser.config import load_default_config
from audit_reverser.config.loader import load_rules
from audit_reverser.config.model import Config, GitTarget, Key
from audit_reverser.context import EventContext
from audit_reverser.encryption.certs import make as make_certs
from audit_reverser.errors import AuditReverserError, ConfigError, PermanentError
from audit_reverser.ha.connection import Connection, JournalSettings, connect
from audit_reverser.ha.lease import DEFAULT_LEASE_S
from audit_reverser.ingest import auth
from audit_reverser.ingest.intake import DEFAULT_MAX_BACKLOG
from audit_reverser.ingest.logfiles import read_chunks, size_of
from audit_reverser.ingest.server import DEFAULT_MAX_BODY_BYTES, make_app
from audit_reverser.metrics import exposition
from audit_reverser.pipeline.filter import Skip
from audit_reverser.pipeline.home import HomeCluster
from audit_reverser.pipeline.layout import CLUSTER_NAME
from audit_reverser.pipeline.noise import DEFAULT_EXCLUDED_USERS, Exclusions
from audit_reverser.providers import ProviderCheck, check_remotes, usable_providers
from audit_reverser.runtime import (
    DEFAULT_COMMITTER,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    Runtime,
    Settings,
)

log = logging.getLogger("audit_reverser")

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_STATE_DIR = ".audit-reverser"
# A renewed serving certificate (cert-manager, a Secret volume) is picked up this often.
CERTIFICATE_RELOAD_INTERVAL_S = 30.0
# serve --journal: another replica took the writer lease from this one (EX_TEMPFAIL); a
# supervisor (Kubernetes) starts it again, as a standby.
EXIT_LEASE_LOST = 75
MAX_RESYNC_INTERVAL_S = 7 * 24 * 3600


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdecimal() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audit-reverser",
        description="Kubernetes audit events in, attributed YAML commits in Git out.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def logging_options(sub: argparse.ArgumentParser, *, top: bool) -> None:
        # Accepted before and after the command (`audit-reverser serve --log-format json`, as
        # container args after the image's entrypoint give it); a command's own default is
        # SUPPRESS so that it never undoes a value given before the command.
        sub.add_argument(
            "--log-format",
            default="text" if top else argparse.SUPPRESS,
            choices=["text", "json"],
            help="json: one object per line, with audit_id and target on lines about an event",
        )
        sub.add_argument(
            "--log-level",
            default="info" if top else argparse.SUPPRESS,
            choices=["debug", "info", "warning", "error"],
            help="default: info",
        )

    logging_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            action="append",
            default=[],
            metavar="PATH",
            help="YAML file or folder with GitProvider, GitTarget, WatchRule, "
            "ClusterWatchRule (and v1 Secret) documents; repeatable. "
            "Without it: the embedded default (./audit-repo.git)",
        )

    def common(sub: argparse.ArgumentParser) -> None:
        config_option(sub)
        sub.add_argument(
            "--state-dir",
            type=Path,
            default=Path(DEFAULT_STATE_DIR),
            metavar="DIR",
            help=f"local mirrors and state (default: ./{DEFAULT_STATE_DIR})",
        )

    serve = commands.add_parser(
        "serve", help="receive audit webhook batches", description="Run the audit webhook receiver."
    )
    common(serve)
    noise_options(serve)
    serve.add_argument(
        "--listen",
        type=_listen_address,
        default=_listen_address(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"default: {DEFAULT_LISTEN}",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help="larger requests get 413 (default: 16 MiB, above the apiserver's 10 MiB batches)",
    )
    serve.add_argument(
        "--max-backlog",
        type=_positive,
        default=DEFAULT_MAX_BACKLOG,
        metavar="N",
        help="accepted events not yet committed above which batches get 429 "
        f"(default: {DEFAULT_MAX_BACKLOG})",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="SECONDS",
        help="time to commit and push on SIGTERM; the rest stays in the journal (default: 20)",
    )
    shared = serve.add_argument_group(
        "shared journal (docs/ha.md; without --journal, the journal is in --state-dir)"
    )
    shared.add_argument(
        "--journal",
        metavar="URL",
        help="keep the journal in Redis or Valkey ≥ 7: redis://HOST:PORT[/DB], rediss:// for "
        "TLS; a 200 then means the events are durable there",
    )
    shared.add_argument(
        "--journal-password-file",
        type=Path,
        metavar="FILE",
        help="the Redis password (never in the URL)",
    )
    shared.add_argument(
        "--journal-replicas",
        type=int,
        default=0,
        metavar="N",
        help="Redis replicas that must also hold a write before the 200 (default: 0)",
    )
    shared.add_argument(
        "--journal-lease",
        type=_seconds,
        default=DEFAULT_LEASE_S,
        metavar="SECONDS",
        help="how long the writer lease lasts unrenewed: a standby replica takes over this "
        f"long after the writer stops at most, plus a third (default: {DEFAULT_LEASE_S:g})",
    )
    cluster = serve.add_argument_group(
        "cluster (rules from its custom resources unless --config is given, and the objects "
        "events do not carry)"
    )
    cluster.add_argument(
        "--kubeconfig", type=Path, metavar="FILE", help="read objects from this cluster"
    )
    cluster.add_argument(
        "--in-cluster",
        action="store_true",
        help="read objects with the pod's service account",
    )
    cluster.add_argument(
        "--cluster",
        action="append",
        default=[],
        type=_fleet_member,
        dest="fleet",
        metavar="NAME[=KUBECONFIG]",
        help="NAME=KUBECONFIG, repeatable: a fleet, events posted to /audit-webhook/NAME read "
        "the objects they lack from this cluster, and no other; rules from --config, else "
        "from each cluster's own custom resources. NAME alone, "
        "with --kubeconfig or --in-cluster: that cluster's name (default: the first name "
        "events are posted under); other names' events go to their own folders "
        "(docs/fleet.md)",
    )
    cluster.add_argument(
        "--resync-interval",
        type=_resync_interval,
        default=DEFAULT_RESYNC_INTERVAL_S,
        metavar="SECONDS",
        help="compare each GitTarget's folder with the cluster at start and then this often; "
        "what differs becomes one [RESYNC] commit (default: 600; 0: never)",
    )
    security = serve.add_argument_group("sender authentication")
    security.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with this certificate (PEM, chain)",
    )
    security.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="private key of --tls-cert (PEM)"
    )
    security.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="require a client certificate signed by this CA (mutual TLS) on /audit-webhook",
    )
    security.add_argument(
        "--client-name",
        action="append",
        default=[],
        metavar="NAME",
        help="with --client-ca: accept only certificates with this CN or subjectAltName; "
        "repeatable",
    )
    security.add_argument(
        "--cluster-names-in-certificates",
        action="store_true",
        help="with --client-ca (a fleet): take events posted to /audit-webhook/NAME only from "
        "a client certificate whose CN or subjectAltName is NAME, and none posted without a "
        "name; so that one cluster's credentials cannot write another cluster's files",
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        metavar="FILE",
        help="require 'Authorization: Bearer <token>' with the token in this file",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address with neither a client CA nor a token",
    )

    check = commands.add_parser(
        "check",
        help="check that every GitProvider can be pushed to",
        description="For each GitProvider and branch the GitTargets use: is the remote "
        "reachable, do the credentials work, is the branch allowed, may we push (checked "
        "without pushing). Exit status 0 when all are ready.",
    )
    config_option(check)
    check.add_argument("--json", action="store_true", help="print the results as JSON")

    snap = commands.add_parser(
        "snapshot",
        help="commit every object the rules select, and prune files whose object is gone",
        description="List what each GitTarget's rules select in the cluster, commit it as one "
        "[SNAPSHOT] commit, remove files whose object is gone in a [PRUNE] commit, and push. "
        "Rules come from --config, or else from the cluster.",
    )
    common(snap)
    snap_api = snap.add_mutually_exclusive_group(required=True)
    snap_api.add_argument("--kubeconfig", type=Path, metavar="FILE", help="the cluster")
    snap_api.add_argument(
        "--in-cluster", action="store_true", help="the pod's cluster and service account"
    )
    snap.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAMESPACE/NAME",
        help="only these GitTargets (repeatable; default: all)",
    )

    hook = commands.add_parser(
        "webhook-config",
        help="print the kubeconfig the kube-apiserver's --audit-webhook-config-file needs",
        description="Print the kubeconfig file that points the kube-apiserver's audit webhook "
        "backend (--audit-webhook-config-file) at this receiver.",
    )
    hook.add_argument(
        "--url",
        required=True,
        help="the receiver's webhook URL, e.g. https://audit-reverser.example:8443/audit-webhook",
    )
    hook.add_argument("--ca", type=Path, metavar="FILE", help="CA that signed the serving cert")
    hook.add_argument(
        "--token-file", type=Path, metavar="FILE", help="the token serve --auth-token-file checks"
    )
    hook.add_argument(
        "--client-cert", type=Path, metavar="FILE", help="client certificate for serve --client-ca"
    )
    hook.add_argument("--client-key", type=Path, metavar="FILE", help="its private key")

    certs = commands.add_parser(
        "certs",
        help="make a CA, a serving certificate and an apiserver client certificate",
        description="Write ca.crt/key, server.crt/key and client.crt/key into a folder for a "
        "quick start with serve --tls-cert/--tls-key/--client-ca and webhook-config. Keys are "
        "0600 and never overwritten. For production, use cert-manager or your own PKI.",
    )
    certs.add_argument("--out", type=Path, required=True, metavar="DIR")
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="DNS name or IP the apiserver uses to reach serve (repeatable; the first is the CN)",
    )
    certs.add_argument(
        "--client-name",
        default="kube-apiserver",
        help="common name of the client certificate (serve --client-name; default: %(default)s)",
    )
    certs.add_argument("--days", type=_positive, default=365, help="validity (default: 365)")

    replay = commands.add_parser(
        "replay",
        help="run audit log files through the pipeline",
        description="Replay audit log files (JSON Lines or EventList "
        "JSON; '-' for stdin), commit and push.",
    )
    common(replay)
    noise_options(replay)
    replay.add_argument(
        "--cluster",
        default="",
        type=_cluster_name,
        help="cluster name: the Cluster: trailer, and the cluster's folder under each "
        "target's path (docs/fleet.md)",
    )
    replay.add_argument("files", nargs="+", metavar="FILE")
    for sub in (serve, check, snap, hook, certs, replay):
        logging_options(sub, top=False)
    return parser


def noise_options(sub: argparse.ArgumentParser) -> None:
    noise = sub.add_argument_group("changes that are not commits")
    noise.add_argument(
        "--exclude-user",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip changes by these users (repeatable; e.g. 'system:serviceaccount:flux-system:*')",
    )
    noise.add_argument(
        "--exclude-field-manager",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip writes with this fieldManager (repeatable; e.g. 'kustomize-controller')",
    )
    noise.add_argument(
        "--no-default-excludes",
        action="store_true",
        help="also take the control plane's own writes (by default skipped: "
        + ", ".join(DEFAULT_EXCLUDED_USERS)
        + ")",
    )


def _exclusions(args: argparse.Namespace) -> Exclusions:
    users = () if args.no_default_excludes else DEFAULT_EXCLUDED_USERS
    return Exclusions(
        users=users + tuple(args.exclude_user),
        field_managers=tuple(args.exclude_field_manager),
    )


def _cluster_name(text: str) -> str:
    if text and not CLUSTER_NAME.match(text):  # '' is no cluster: replay's default
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a cluster name (letters, digits, '.', '_', '-'; at most 63)"
        )
    return text


def _fleet_member(text: str) -> tuple[str, Path | None]:
    """``NAME=KUBECONFIG`` (a fleet's cluster), or ``NAME`` alone (the name of the cluster
    --kubeconfig or --in-cluster reads)."""
    name, sep, kubeconfig = text.partition("=")
    if not name or (sep and not kubeconfig):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=KUBECONFIG or NAME")
    return _cluster_name(name), Path(kubeconfig) if sep else None


def _positive(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 < s < 3600)")
    return value


def _resync_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value != 0 and not 1 <= value <= MAX_RESYNC_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 0 (never) or a number of seconds from 1 to {MAX_RESYNC_INTERVAL_S}"
        )
    return value


def _runtime(
    args: argparse.Namespace,
    source: ApiObjects | None = None,
    config: Config | None = None,
    *,
    sources: Mapping[str, ApiObjects] | None = None,
    cluster_name: str | None = None,
    problems: Sequence[str] = (),
    **options: Any,
) -> Runtime:
    """Load the config (unless given: rules from a cluster, with ``problems``) and build
    the runtime; file access, so it runs off the event loop."""
    if config is None:
        if args.config:
            config, problems = load_rules(args.config)
            options["leave_out_broken"] = True  # reported; the healthy targets run
        else:
            config = load_default_config()
            # Only the embedded default creates its missing local remote; see Settings.
            options["create_local_remotes"] = True
        # Rules from files serve whichever clusters post, each in its own folder; with one
        # cluster's API (--kubeconfig, --in-cluster) the receiver is that cluster's, and its
        # snapshots and resyncs write the target's folder itself.
        config = dataclasses.replace(config, cluster_folders=source is None)
    # One cluster's API: that cluster's events are its own, others' go to their folders.
    home = HomeCluster.load(args.state_dir, cluster_name) if source is not None else None
    return Runtime(
        config,
        Settings(state_dir=args.state_dir, **options),
        source=source,
        sources=sources,
        home=home,
        problems=problems,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _senders(args: argparse.Namespace) -> tuple[auth.SenderPolicy, ssl.SSLContext | None]:
    """The sender policy and TLS context the flags ask for; refuses unsafe combinations."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise PermanentError("--tls-cert and --tls-key go together")
    if args.client_ca is not None and args.tls_cert is None:
        raise PermanentError("--client-ca needs --tls-cert and --tls-key")
    if args.client_name and args.client_ca is None:
        raise PermanentError("--client-name needs --client-ca")
    if args.cluster_names_in_certificates and args.client_ca is None:
        raise PermanentError("--cluster-names-in-certificates needs --client-ca")
    context = None
    if args.tls_cert is not None:
        context = auth.server_context(args.tls_cert, args.tls_key, args.client_ca)
    senders = auth.policy(
        token_file=args.auth_token_file,
        client_ca=args.client_ca,
        client_names=args.client_name,
        cluster_names=args.cluster_names_in_certificates,
    )
    host = args.listen[0]
    if not _is_loopback(host):
        # TLS alone proves who we are, not who sends: without a client CA or a token, anyone
        # who can connect could write (and delete) files in Git.
        if not senders.authenticates:
            if not args.insecure:
                raise PermanentError(
                    f"refusing to accept unauthenticated audit events on {host}: use "
                    "--tls-cert/--tls-key with --client-ca, or --auth-token-file "
                    "(or --insecure to accept anyone who can connect)"
                )
            log.warning("--insecure: anyone who can reach %s may send audit events", host)
        elif context is None:
            log.warning("the bearer token travels in clear text; add --tls-cert/--tls-key")
    return senders, context


def _tune_interpreter_for_ingest() -> None:
    """Settings measured with bench/ingest.py (README, performance).

    A 400-event batch decodes into some ten thousand dicts and lists. At CPython's default
    threshold (700 allocations) that is a dozen collections per batch, with the older
    generations rescanned as the heap grows: p99 latency went from 17 ms to 4 ms with a
    higher threshold. The decoded JSON holds no cycles, so reference counting frees it
    anyway. Objects made at start-up (config, routes) are frozen out of every collection.
    pygit2 holds the GIL through long stretches in the writer threads; a shorter switch
    interval gives the event loop its turn sooner.
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    sys.setswitchinterval(0.001)


async def serve(args: argparse.Namespace) -> int:
    senders, context = await asyncio.to_thread(_senders, args)
    named = [name for name, kubeconfig in args.fleet if kubeconfig is None]
    if named:
        if len(args.fleet) > 1:
            raise PermanentError(
                "--cluster NAME names the one cluster of --kubeconfig or --in-cluster: give it "
                "once, or NAME=KUBECONFIG for each cluster of a fleet"
            )
        if args.kubeconfig is None and not args.in_cluster:
            raise PermanentError(
                f"--cluster {named[0]} needs --kubeconfig or --in-cluster (or "
                f"{named[0]}=KUBECONFIG for a fleet)"
            )
    elif args.fleet:
        return await _serve_fleet(args, senders, context)
    api = None
    if args.kubeconfig is not None or args.in_cluster:
        api = await KubeApi.connect(args.kubeconfig)
        log.info("objects the events do not carry are read from %s", api.server)
    rules = None
    try:
        config = None
        if api is not None and not args.config:
            rules = ClusterRules(api)
            if args.journal is not None:  # a standby until it writes (see _serve)
                rules.generates_keys = lambda: False
            config = await rules.start()
            log.info(
                "rules from the cluster: %d GitTargets, %d WatchRules, %d ClusterWatchRules",
                len(config.targets),
                len(config.watch_rules),
                len(config.cluster_watch_rules),
            )
        return await _serve(
            args, senders, context, api, config, rules, cluster_name=named[0] if named else None
        )
    finally:
        if rules is not None:
            await rules.close()
        if api is not None:
            await api.close()


async def _redis_journal(args: argparse.Namespace) -> Connection | None:
    """The checked connection ``--journal`` asks for: a wrong password or an unreachable
    Redis ends the start here, in one line."""
    if args.journal is None:
        for flag in ("journal_password_file", "journal_replicas"):
            if getattr(args, flag):
                raise PermanentError(f"--{flag.replace('_', '-')} needs --journal")
        return None
    settings = JournalSettings(
        url=args.journal, password_file=args.journal_password_file, replicas=args.journal_replicas
    )
    return await connect(settings)


async def _serve_fleet(
    args: argparse.Namespace, senders: auth.SenderPolicy, context: ssl.SSLContext | None
) -> int:
    """``serve --cluster NAME=KUBECONFIG``...: each cluster's objects come from its own API;
    the rules from --config serve every cluster, each in its own folder, or else each
    cluster's rules are its own custom resources (cluster.fleet)."""
    if args.kubeconfig is not None or args.in_cluster:
        raise PermanentError("--cluster replaces --kubeconfig and --in-cluster: use either")
    names = [name for name, _ in args.fleet]
    if len(set(names)) != len(names):
        raise PermanentError(f"--cluster: each name once (got {', '.join(names)})")
    apis: dict[str, KubeApi] = {}
    try:
        for name, kubeconfig in args.fleet:
            apis[name] = await KubeApi.connect(kubeconfig)
            log.info(
                "cluster %s: events at /audit-webhook/%s, objects they lack from %s",
                name,
                name,
                apis[name].server,
            )
        if args.config:
            folders = FolderFleet(apis)
            return await _serve(
                args, senders, context, None, None, None, sources=folders.objects, folders=folders
            )
        fleet = FleetRules(apis)
        for own in fleet.rules.values() if args.journal is not None else ():
            own.generates_keys = lambda: False  # a standby until it writes (see _serve)
        try:
            config = await fleet.start()
            log.info(
                "rules from each cluster's custom resources: %d GitTargets, %d WatchRules, "
                "%d ClusterWatchRules",
                len(config.targets),
                len(config.watch_rules),
                len(config.cluster_watch_rules),
            )
            return await _serve(
                args, senders, context, None, config, None, sources=fleet.objects, fleet=fleet
            )
        finally:
            await fleet.close()
    finally:
        for api in apis.values():
            await api.close()


async def _serve(
    args: argparse.Namespace,
    senders: auth.SenderPolicy,
    context: ssl.SSLContext | None,
    api: KubeApi | None,
    config: Config | None,
    rules: ClusterRules | None,
    *,
    sources: Mapping[str, ApiObjects] | None = None,
    cluster_name: str | None = None,
    fleet: FleetRules | None = None,
    folders: FolderFleet | None = None,
) -> int:
    source = ApiObjects(api) if api is not None else None
    redis_journal = await _redis_journal(args)
    runtime = await asyncio.to_thread(
        _runtime,
        args,
        source,
        config,
        sources=sources,
        cluster_name=cluster_name,
        problems=_problems(rules, fleet),
        journal=True,
        redis_journal=redis_journal,
        journal_lease_s=args.journal_lease,
        max_backlog=args.max_backlog,
        shutdown_timeout_s=args.shutdown_timeout,
        retry_push_at_stop=True,
        exclusions=_exclusions(args),
        rules_from_files=rules is None and fleet is None,
    )
    _tune_interpreter_for_ingest()
    with_api = api is not None or fleet is not None or folders is not None
    resyncs = ResyncStats() if with_api and args.resync_interval else None
    app = make_app(
        runtime,
        max_body_bytes=args.max_body_bytes,
        senders=senders,
        metrics=lambda: exposition(runtime, resyncs),
        waiting_for=runtime.waiting_for,
    )
    # In-flight requests get a few seconds to finish; the rest is the apiserver's to retry.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5)
    await runner.setup()  # starts the runtime
    reporter = scheduler = resyncer = None
    reloading: asyncio.Task[None] | None = None
    exit_code = 0
    if resyncs is not None:

        async def resync(targets: list[GitTarget]) -> Mapping[Key, ResyncResult | Exception]:
            if folders is not None:  # each cluster's folders with its own API
                return await folders.resync(targets, runtime.resync)
            if fleet is not None:  # each target with its own cluster's API
                return await fleet.resync(targets, runtime.resync)
            assert api is not None and source is not None
            return await runtime.resync(targets, api, source)

        def resynced() -> Iterable[GitTarget]:
            if folders is not None:
                return folders.targets(runtime.config)
            return runtime.config.targets.values()

        resyncer = Resyncer(
            interval_s=args.resync_interval, targets=resynced, run=resync, stats=resyncs
        )
    if rules is not None and api is not None and source is not None:
        reporter = StatusReporter(api, rules, runtime.status_state)

        async def take(target: GitTarget) -> SnapshotResult | None:
            return await runtime.take_snapshot(target, api, source)

        scheduler = SnapshotScheduler(api, rules, take)
        scheduler.update(runtime.config)

        async def changed(new: Config) -> None:
            await runtime.reconfigure(new, list(rules.problems.values()))
            reporter.poke()
            scheduler.update(new)

        rules.on_change = changed
    if fleet is not None:

        async def fleet_changed(new: Config) -> None:
            await runtime.reconfigure(new, fleet.problems)

        fleet.on_change = fleet_changed
        if resyncer is not None:
            fleet.on_join = lambda name: resyncer.soon()  # changes missed while it was away
        fleet.join_away()
    # What one replica at a time may do waits until this one writes (at once without a
    # shared journal); a writer that loses the lease exits, and these with it.
    single = asyncio.create_task(
        _single_jobs(runtime, rules, fleet, [j for j in (resyncer, reporter, scheduler) if j])
    )
    try:
        host, port = args.listen
        site = web.TCPSite(runner, host, port, ssl_context=context)
        try:
            await site.start()
        except OSError as exc:
            raise AuditReverserError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        scheme = "https" if context is not None else "http"
        for address in runner.addresses:
            log.info("listening on %s://%s:%s/audit-webhook", scheme, *address[:2])
        if runtime.settings.create_local_remotes:
            log.info("embedded default config: every write goes to ./audit-repo.git")
        if context is not None:
            reloading = asyncio.create_task(
                _reload_certificate(auth.CertificateReloader(context, args.tls_cert, args.tls_key))
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        lost = runtime.redis_journal.lost if runtime.redis_journal is not None else None
        await _first_of(stop, lost)
        if lost is not None and lost.is_set():
            # Whatever the pipeline holds belongs to the new writer now: start again clean.
            log.error("stopping: another replica writes now; this one starts again as a standby")
            exit_code = EXIT_LEASE_LOST
        else:
            log.info("stopping: finishing accepted events and pushing")
        runtime.accepting = False
    finally:
        single.cancel()
        if reloading is not None:
            reloading.cancel()
        if resyncer is not None:
            await resyncer.close()
        if scheduler is not None:
            await scheduler.close()
        if reporter is not None:
            await reporter.close()
        if fleet is not None:
            await fleet.stop_reporting()
        await runner.cleanup()
    return exit_code


async def _single_jobs(
    runtime: Runtime,
    rules: ClusterRules | None,
    fleet: FleetRules | None,
    jobs: Sequence[Resyncer | StatusReporter | SnapshotScheduler],
) -> None:
    """Start what only the writer does: resyncs, status patches, snapshots of new
    GitTargets and the keys generateWhenMissing makes, once this replica writes."""
    await runtime.until_leading()
    for job in jobs:
        job.start()
    if fleet is not None:
        fleet.report(runtime.status_state, runtime.take_snapshot, runtime.config)
    every = [rules] if rules is not None else list(fleet.rules.values()) if fleet else []
    for own in every if runtime.redis_journal is not None else ():
        own.generates_keys = lambda: runtime.leads
        own.rebuild()  # keys a standby left ungenerated


async def _first_of(*events: asyncio.Event | None) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events if e is not None]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _problems(rules: ClusterRules | None, fleet: FleetRules | None) -> list[str]:
    if fleet is not None:
        return fleet.problems
    return list(rules.problems.values()) if rules is not None else []


async def _reload_certificate(reloader: auth.CertificateReloader) -> None:
    while True:
        await asyncio.sleep(CERTIFICATE_RELOAD_INTERVAL_S)
        try:
            if await asyncio.to_thread(reloader.reload_if_changed):
                log.info("serving certificate changed on disk: reloaded")
        except PermanentError as exc:
            log.error("serving certificate changed but does not load, keeping the old one: %s", exc)


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._last = 0.0

    def update(self, name: str, position: int, total: int | None, events: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        share = f"{100 * position / total:5.1f}%" if total else f"{position >> 20} MiB"
        sys.stderr.write(f"\r{name}: {share}  {events} events")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")


async def replay(args: argparse.Namespace) -> int:
    runtime = await asyncio.to_thread(_runtime, args, exclusions=_exclusions(args))
    stats = runtime.stats
    progress = _Progress()
    await runtime.start()
    try:
        for name in args.files:
            total = size_of(name)
            chunks = read_chunks(name)
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                if chunk.malformed:
                    stats.received += chunk.malformed
                    stats.skip(Skip.MALFORMED, chunk.malformed)
                triage = runtime.intake.triage(chunk.items, cluster=args.cluster, source=name)
                await runtime.intake.accept(triage, cluster=args.cluster)
                progress.update(name, chunk.position, total, stats.received)
        failures = await runtime.flush()
    finally:
        progress.done()
        await runtime.close()

    writers = runtime.writers.values()
    commits = sum(w.stats.commits for w in writers)
    failed = sum(w.stats.failed for w in writers)
    print(f"events read: {stats.received}")
    print(f"kept: {stats.kept}")
    print(f"skipped: {sum(stats.skipped.values())}")
    for reason, count in sorted(stats.skipped.items()):
        print(f"  {reason}: {count}")
    print(
        f"commits: {commits} (unchanged: {sum(w.stats.unchanged for w in writers)}, "
        f"failed: {failed})"
    )
    print(
        f"pushes: {sum(w.stats.pushes for w in writers)} "
        f"({sum(w.stats.pushed_commits for w in writers)} commits)"
    )
    for failure in failures:
        print(f"audit-reverser: error: {failure}", file=sys.stderr)
    return 1 if failures or failed else _left_out(runtime.problems)


def _left_out(problems: Sequence[str]) -> int:
    """Name what the config left out, after the healthy targets did their work: exit
    status 2 when there is any, as for any config error, else 0."""
    for problem in problems:
        print(f"audit-reverser: config error: left out: {problem}", file=sys.stderr)
    return 2 if problems else 0


async def check(args: argparse.Namespace) -> int:
    config, problems = await asyncio.to_thread(
        lambda: load_rules(args.config) if args.config else (load_default_config(), [])
    )
    config, unusable = await asyncio.to_thread(usable_providers, config)
    problems = [*problems, *unusable]
    with tempfile.TemporaryDirectory(prefix="audit-reverser-trust-") as home:
        results = await check_remotes(config, Path(home))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "provider": str(r.provider.key),
                        "url": r.health.remote,
                        "branch": r.health.branch,
                        "targets": [str(t) for t in r.targets],
                        "ready": r.ready,
                        "reason": r.reason,
                        "message": r.message,
                        "checks": [dataclasses.asdict(c) for c in r.health.checks],
                        "signing": _signing_json(r),
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    else:
        for result in results:
            health = result.health
            provider = f"{result.provider.kind} {result.provider.key}"
            print(f"{provider}: {health.remote} branch {health.branch}")
            allowed = ", ".join(result.provider.allowed_branches)
            print(f"  ok    branch allowed (allowedBranches: {allowed})")
            for item in health.checks:
                print(f"  {'ok' if item.ok else 'FAIL':5} {item.name}: {item.detail}")
            _print_signing(result)
            print("  Ready" if result.ready else f"  Not ready: {result.reason}")
    ready = all(r.ready for r in results)
    left_out = _left_out(problems)
    return left_out if ready else 1


def _print_signing(result: ProviderCheck) -> None:
    """The signing key's public half, to register with the committer's account."""
    if result.signing_problem is not None:
        print(f"  FAIL  signing: {result.signing_problem}")
        return
    committer = result.signing.committer or DEFAULT_COMMITTER
    key = result.signing.key
    if key is None:
        print(f"  -     signing: off, committer {committer.name} <{committer.email}>")
        return
    print(f"  ok    signing: {key.fingerprint} as {committer.name} <{committer.email}>")
    print(f"        {key.public_key}")


def _signing_json(result: ProviderCheck) -> dict[str, Any]:
    key = result.signing.key
    committer = result.signing.committer or DEFAULT_COMMITTER
    return {
        "committer": {"name": committer.name, "email": committer.email},
        "publicKey": key.public_key if key is not None else None,
        "fingerprint": key.fingerprint if key is not None else None,
        "problem": result.signing_problem,
    }


async def snapshot(args: argparse.Namespace) -> int:
    api = await KubeApi.connect(args.kubeconfig)
    try:
        config = None
        if not args.config:
            rules = ClusterRules(api)
            try:
                config = await rules.start()
            finally:
                await rules.close()
        source = ApiObjects(api)
        runtime = await asyncio.to_thread(
            _runtime, args, source, config, rules_from_files=config is None
        )
        wanted = {Key(namespace=t.partition("/")[0], name=t.partition("/")[2]) for t in args.target}
        unknown = wanted - set(runtime.config.targets)
        if unknown:
            raise ConfigError(
                [f"--target {key}: no such GitTarget" for key in sorted(map(str, unknown))]
            )
        await runtime.start()
        try:
            for key, target in sorted(runtime.config.targets.items(), key=lambda kv: str(kv[0])):
                if wanted and key not in wanted:
                    continue
                result = await runtime.take_snapshot(target, api, source)
                if result is None:
                    print(f"GitTarget {key}: left out (its GitProvider cannot be used)")
                    continue
                print(
                    f"GitTarget {key}: {result.files} objects, "
                    f"snapshot {'committed' if result.written else 'unchanged'}, "
                    f"{'stale files pruned' if result.pruned else 'nothing to prune'}"
                )
            failures = await runtime.flush()
        finally:
            await runtime.close()
    finally:
        await api.close()
    for failure in failures:
        print(f"audit-reverser: error: {failure}", file=sys.stderr)
    return 1 if failures else _left_out(runtime.problems)


async def certs(args: argparse.Namespace) -> int:
    written = await asyncio.to_thread(
        make_certs, args.out, hosts=args.host, client_name=args.client_name, days=args.days
    )
    print(f"CA:     {written.ca}  (webhook-config --ca)")
    server_key = written.server.with_suffix(".key")
    print(f"server: {written.server}  (serve --tls-cert, --tls-key {server_key})")
    print(
        f"client: {written.client}  (webhook-config --client-cert; serve --client-ca {written.ca})"
    )
    return 0


async def webhook_config(args: argparse.Namespace) -> int:
    print(await asyncio.to_thread(_webhook_kubeconfig, args), end="")
    return 0


def _webhook_kubeconfig(args: argparse.Namespace) -> str:
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError([f"--url {args.url!r}: expected https://HOST[:PORT]/audit-webhook"])
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        log.warning("--url is plain HTTP to another host: audit events would cross it unencrypted")
    if (args.client_cert is None) != (args.client_key is None):
        raise ConfigError(["--client-cert and --client-key go together"])

    def read(option: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"{option} {path}: {exc.strerror}"]) from None

    def b64(option: str, path: Path) -> str:
        return base64.b64encode(read(option, path)).decode()

    cluster: dict[str, Any] = {"server": args.url}
    if args.ca is not None:
        cluster["certificate-authority-data"] = b64("--ca", args.ca)
    user: dict[str, Any] = {}
    if args.token_file is not None:
        token = read("--token-file", args.token_file).decode().strip()
        if not token:
            raise ConfigError([f"--token-file {args.token_file}: the file is empty"])
        user["token"] = token
    if args.client_cert is not None:
        user["client-certificate-data"] = b64("--client-cert", args.client_cert)
        user["client-key-data"] = b64("--client-key", args.client_key)
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "audit-reverser", "cluster": cluster}],
        "users": [{"name": "kube-apiserver", "user": user}],
        "contexts": [
            {
                "name": "audit-webhook",
                "context": {"cluster": "audit-reverser", "user": "kube-apiserver"},
            }
        ],
        "current-context": "audit-webhook",
    }
    header = (
        "# kube-apiserver --audit-webhook-config-file: where audit events go (audit-reverser).\n"
        "# Contains credentials: keep it as private as the apiserver's own files.\n"
    )
    return header + yaml.safe_dump(kubeconfig, sort_keys=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines (Loki, Elasticsearch...)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in ("audit_id", "target"):
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EventContext())
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    command = {
        "serve": serve,
        "replay": replay,
        "check": check,
        "snapshot": snapshot,
        "webhook-config": webhook_config,
        "certs": certs,
    }[args.command]
    try:
        return asyncio.run(command(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"audit-reverser: config error: {problem}", file=sys.stderr)
        return 2
    except AuditReverserError as exc:
        print(f"audit-reverser: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
