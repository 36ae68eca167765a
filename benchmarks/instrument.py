"""In-process call counters for IAM (botocore) and Vault (requests), shared by rotator and the
lower bound so both pay the same (tiny) instrumentation cost.

Every HTTP attempt botocore sends is counted by the ``Action=`` of its form body (IAM and STS
speak the query protocol), so retries count too; every request hvac sends through ``requests``
is counted by method and a coarse kind of path (state, lock, published secret, token, mount).
"""

from __future__ import annotations

import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import botocore.endpoint
import requests.adapters

_lock = threading.Lock()
_iam: Counter[str] = Counter()
_vault: Counter[str] = Counter()
_installed = False


def _action(body: Any) -> str:
    if isinstance(body, bytes | bytearray):
        body = bytes(body).decode("utf-8", "replace")
    if not isinstance(body, str):
        return "?"
    values = urllib.parse.parse_qs(body).get("Action")
    return values[0] if values else "?"


def vault_kind(method: str, path: str) -> str:
    """A coarse name for a Vault request: ``GET state``, ``POST lock``, ``GET token``..."""
    path = path.split("?", 1)[0]
    if "/locks/" in path:
        kind = "lock"
    elif "/targets/" in path:
        kind = "state"
    elif path.startswith("/v1/auth/"):
        kind = "token"
    elif path.startswith("/v1/sys/"):
        kind = "sys"
    else:
        kind = "secret"
    return f"{method} {kind}"


def install() -> None:
    """Wrap botocore's and requests' senders once per process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    send_boto = botocore.endpoint.Endpoint._send
    send_http = requests.adapters.HTTPAdapter.send

    def counted_boto(self: Any, request: Any) -> Any:
        name = _action(request.body)
        with _lock:
            _iam[name] += 1
        return send_boto(self, request)

    def counted_http(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        path = urllib.parse.urlsplit(request.url).path
        name = vault_kind(str(request.method), path)
        with _lock:
            _vault[name] += 1
        return send_http(self, request, *args, **kwargs)

    botocore.endpoint.Endpoint._send = counted_boto  # type: ignore[method-assign]
    requests.adapters.HTTPAdapter.send = counted_http  # type: ignore[method-assign]


class Counts:
    """The calls made while a ``measure()`` block ran."""

    def __init__(self) -> None:
        self.iam: Counter[str] = Counter()
        self.vault: Counter[str] = Counter()

    @property
    def iam_total(self) -> int:
        return sum(self.iam.values())

    @property
    def vault_total(self) -> int:
        return sum(self.vault.values())

    @property
    def vault_reads(self) -> int:
        return sum(v for k, v in self.vault.items() if k.startswith("GET "))

    @property
    def vault_writes(self) -> int:
        return self.vault_total - self.vault_reads


@contextmanager
def measure() -> Iterator[Counts]:
    """Counts of the calls made inside the block (process-wide: run one thing at a time)."""
    install()
    with _lock:
        iam0, vault0 = Counter(_iam), Counter(_vault)
    counts = Counts()
    try:
        yield counts
    finally:
        with _lock:
            counts.iam = _iam - iam0
            counts.vault = _vault - vault0
