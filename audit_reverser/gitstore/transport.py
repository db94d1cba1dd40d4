"""How a mirror reaches its remote: local paths, SSH with a deploy key, HTTPS with a token.

Credentials come from the GitProvider's (or Flux GitRepository's) Secret, with the keys the
seed and Flux use, read here and nowhere else: ``ssh-privatekey`` or Flux's ``identity``
(+ optional ``passphrase``, or Flux's ``password``) and ``known_hosts`` for SSH; ``username``
and ``password`` (or ``token``, or Flux's ``bearerToken``) for HTTPS. They live only in the
callbacks handed to libgit2 and are never part of a URL, a log line or an error
(:meth:`Callbacks.explain` scrubs them).

SSH host keys are always verified: libgit2 checks the server's key against
``<home>/.ssh/known_hosts`` and we answer with its verdict. The home is process-wide in
libgit2, so :func:`install_trust` writes the ``known_hosts`` of every SSH provider into
one file under the state directory (and their extra HTTPS authorities, ``ca.crt``, into one
bundle beside the system's).
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import pygit2
from pygit2.enums import CredentialType, Option

from audit_reverser.errors import RepositoryError

# A remote that stops answering must not hold the writer (and its commits) forever.
pygit2.option(Option.SET_SERVER_CONNECT_TIMEOUT, 15_000)
pygit2.option(Option.SET_SERVER_TIMEOUT, 120_000)

_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?[^/:]+:(?!//)")


class Transport(Protocol):
    @property
    def url(self) -> str:
        """The URL handed to libgit2."""

    @property
    def display(self) -> str:
        """The URL as it may appear in logs and errors: never with credentials."""

    def callbacks(self) -> Callbacks: ...


def local_path(url: str) -> Path | None:
    """The filesystem path of a local remote (plain path or file:// URL), else None."""
    if url.startswith("file://"):
        return Path(unquote(urlsplit(url).path)).resolve()
    if "://" in url or _SCP_LIKE.match(url):
        return None
    return Path(url).expanduser().resolve()


def remote_key(url: str) -> str:
    """A normalized form of the URL, so that spellings of one repository share a writer."""
    path = local_path(url)
    if path is not None:
        return f"file://{path}"
    if _SCP_LIKE.match(url):  # git@host:owner/repo.git  ->  ssh://git@host/owner/repo.git
        user_host, _, rest = url.partition(":")
        url = f"ssh://{user_host}/{rest}"
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.scheme == "ssh" and parts.username else ""
    path_part = parts.path.rstrip("/").removesuffix(".git")
    return f"{parts.scheme}://{user}{host}{port}{path_part}"


def mirror_name(url: str, branch: str) -> str:
    """A stable, filesystem-safe folder name for the mirror of one remote branch."""
    return mirror_folder(remote_key(url), branch)


def mirror_folder(key: str, branch: str) -> str:
    """:func:`mirror_name` from the :func:`remote_key` (which may touch the filesystem)."""
    digest = hashlib.sha256(f"{key}\n{branch}".encode()).hexdigest()[:12]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", key.rsplit("/", 1)[-1])[:40] or "repo"
    return f"{tail}-{digest}.git"


class Callbacks(pygit2.RemoteCallbacks):
    """One remote operation's callbacks: credentials (offered once), the host-key verdict,
    and per-reference push rejections, which libgit2 reports here rather than raising."""

    def __init__(self, transport: Transport, credential: Credential | None = None) -> None:
        super().__init__()
        self._transport = transport
        self._credential = credential
        self._offered = False
        self.refused = False
        self.untrusted_host: str | None = None
        self.rejected: dict[str, str] = {}

    def credentials(
        self, url: str, username_from_url: str | None, allowed_types: CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.Keypair:
        if self._credential is None:
            self.refused = True
            raise pygit2.GitError("the remote asks for credentials and none are configured")
        if self._offered:
            # libgit2 asks again after a refusal, many times over; one answer is enough.
            self.refused = True
            raise pygit2.GitError("the remote refused the credentials")
        self._offered = True
        return self._credential.answer(username_from_url, allowed_types)

    def certificate_check(self, certificate: None, valid: bool, host: bytes | str) -> bool:
        if not valid:
            self.untrusted_host = host.decode() if isinstance(host, bytes) else host
        return valid

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message:
            self.rejected[refname] = message

    def explain(self, error: Exception) -> str:
        """What went wrong, for logs and status: never with a credential in it."""
        if self.untrusted_host is not None or isinstance(error, pygit2.CertificateError):
            host = self.untrusted_host or "the server"
            if isinstance(self._credential, SshKey):
                return (
                    f"host key of {host} is not trusted: it is missing from, or differs from, "
                    f"known_hosts in {self._credential.source}"
                )
            source = self._credential.source if self._credential else "the GitProvider's Secret"
            return (
                f"certificate of {host} is not trusted by the system's authorities nor by "
                f"ca.crt in {source}"
            )
        if isinstance(self._credential, SshKey) and "private key" in str(error):
            return (
                f"cannot use the private key in {self._credential.source}: wrong passphrase or "
                "unsupported key format"
            )
        if self.refused:
            source = self._credential.source if self._credential else "no credentials"
            return f"authentication failed ({source})"
        text = str(error)
        if self._credential is not None:
            text = self._credential.scrub(text)
        return scrub(text)


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")


def scrub(text: str) -> str:
    """``text`` with the user information of any URL in it removed."""
    return _USERINFO.sub(r"\1", text)


class Credential(Protocol):
    source: str

    def answer(
        self, username_from_url: str | None, allowed: CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.Keypair: ...

    def scrub(self, text: str) -> str: ...


class SshKey:
    """A deploy key and the host keys to trust, from a GitProvider's Secret."""

    def __init__(self, *, private_key: str, passphrase: str, known_hosts: str, source: str) -> None:
        self.private_key = private_key
        self.passphrase = passphrase
        self.known_hosts = known_hosts
        self.source = source

    def answer(
        self, username_from_url: str | None, allowed: CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.Keypair:
        user = username_from_url or "git"
        if not allowed & CredentialType.SSH_KEY:
            raise pygit2.GitError(f"the server does not accept keys; {self.source} has a key")
        return pygit2.KeypairFromMemory(user, None, self.private_key, self.passphrase)

    def scrub(self, text: str) -> str:
        return text.replace(self.passphrase, "***") if self.passphrase else text


class Password:
    """HTTPS basic credentials: a user name and a password or access token."""

    def __init__(self, *, username: str, password: str, source: str) -> None:
        self.username = username
        self.password = password
        self.source = source

    def answer(
        self, username_from_url: str | None, allowed: CredentialType
    ) -> pygit2.Username | pygit2.UserPass | pygit2.Keypair:
        if not allowed & CredentialType.USERPASS_PLAINTEXT:
            raise pygit2.GitError(f"the server does not accept passwords ({self.source})")
        return pygit2.UserPass(self.username, self.password)

    def scrub(self, text: str) -> str:
        return text.replace(self.password, "***") if self.password else text


class LocalTransport:
    """A bare repository on this machine, by path or ``file://`` URL."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @property
    def url(self) -> str:
        return str(self._path)

    @property
    def display(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    def callbacks(self) -> Callbacks:
        return Callbacks(self)


class NetworkTransport:
    """An SSH or HTTP(S) remote, with the credential its Secret gives (if any)."""

    def __init__(
        self, url: str, credential: Credential | None, authority: str | None = None
    ) -> None:
        self._url = url
        self.credential = credential
        self.authority = authority  # PEM of an extra CA for HTTPS (a private GitLab, Gitea)

    @property
    def url(self) -> str:
        return self._url

    @property
    def display(self) -> str:
        return self._url

    def callbacks(self) -> Callbacks:
        return Callbacks(self, self.credential)


def _text(secret: Mapping[str, bytes], key: str, source: str) -> str | None:
    value = secret.get(key)
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise RepositoryError(f"{source}: {key} is not UTF-8 text") from None


def transport_for(
    url: str, secret: Mapping[str, bytes] | None = None, source: str = "no Secret"
) -> LocalTransport | NetworkTransport:
    """The transport for ``url`` with the credentials in ``secret`` (a Secret's data).

    ``source`` names that Secret in messages ("Secret default/git-creds").
    """
    path = local_path(url)
    if path is not None:
        return LocalTransport(path)
    if _SCP_LIKE.match(url):
        user_host, _, rest = url.partition(":")
        url = f"ssh://{user_host}/{rest}"
    parts = urlsplit(url)
    secret = secret or {}
    if parts.scheme == "ssh":
        key = _text(secret, "ssh-privatekey", source) or _text(secret, "identity", source)
        if key is None:
            raise RepositoryError(
                f"remote {remote_key(url)}: SSH needs a deploy key: put it under "
                f"ssh-privatekey (or identity) in {source} (see spec.secretRef)"
            )
        known_hosts = _text(secret, "known_hosts", source)
        if not known_hosts or not known_hosts.strip():
            raise RepositoryError(
                f"remote {remote_key(url)}: {source} has no known_hosts; host keys are always "
                f"verified (ssh-keyscan -p PORT HOST gives the lines to add)"
            )
        # Flux keeps an encrypted identity's passphrase under password.
        passphrase = _text(secret, "passphrase", source) or _text(secret, "password", source) or ""
        return NetworkTransport(
            url,
            SshKey(private_key=key, passphrase=passphrase, known_hosts=known_hosts, source=source),
        )
    if parts.scheme in ("http", "https"):
        # Credentials written into the URL are taken out of it: libgit2 would log-proof
        # nothing, and the URL ends up in messages.
        username = _text(secret, "username", source) or unquote(parts.username or "") or "git"
        password = (
            _text(secret, "password", source)
            or _text(secret, "token", source)
            # Flux sends it in a Bearer header; libgit2 offers basic authentication only,
            # where Git hosts take an access token as the password.
            or _text(secret, "bearerToken", source)
            or unquote(parts.password or "")
        )
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        credential = (
            Password(username=username, password=password, source=source) if password else None
        )
        authority = _text(secret, "ca.crt", source) or _text(secret, "caFile", source)
        if authority is not None and "-----BEGIN CERTIFICATE-----" not in authority:
            raise RepositoryError(f"{source}: ca.crt is not a PEM certificate")
        return NetworkTransport(clean, credential, authority)
    raise RepositoryError(
        f"remote {scrub(url)}: unsupported URL scheme {parts.scheme!r} (use ssh://, https://, "
        "user@host:path, file:// or a local path)"
    )


def install_trust(home: Path, transports: Iterable[Transport]) -> None:
    """Make libgit2 verify servers with what the providers' Secrets trust: SSH host keys
    (``known_hosts``) and extra certificate authorities for HTTPS (``ca.crt``).

    Both settings are process-wide in libgit2, so the entries of all providers go into one
    file each under ``home``; HTTPS keeps trusting the system's authorities as well.
    """
    known_hosts: list[str] = []
    authorities: list[str] = []
    for transport in transports:
        credential = getattr(transport, "credential", None)
        if isinstance(credential, SshKey):
            known_hosts += [line.strip() for line in credential.known_hosts.splitlines()]
        authority = getattr(transport, "authority", None)
        if authority:
            authorities.append(authority.strip())
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace(
        ssh_dir / "known_hosts", "".join(f"{line}\n" for line in dict.fromkeys(known_hosts) if line)
    )
    pygit2.option(Option.SET_HOMEDIR, str(home))
    if authorities:
        defaults = ssl.get_default_verify_paths()
        system = Path(defaults.cafile) if defaults.cafile else None
        bundle = system.read_text() if system is not None and system.is_file() else ""
        bundle += "".join(f"\n{pem}\n" for pem in dict.fromkeys(authorities))
        _replace(home / "ca-bundle.crt", bundle)
        pygit2.settings.set_ssl_cert_locations(str(home / "ca-bundle.crt"), defaults.capath)


def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
