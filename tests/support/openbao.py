"""pytest fixtures for OpenBao as Vault.

``openbao_server`` is one dev server for the whole session; ``vault`` gives each test its own
fresh KV v2 mount on it, so tests never see each other's secrets.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hvac
import pytest

from tests.support import servers

_mount_numbers = itertools.count(1)


@dataclass
class VaultFixture:
    """A running OpenBao, its root token and a KV v2 mount that belongs to one test."""

    address: str
    root_token: str
    mount: str
    server: servers.OpenBaoServer
    _clients: list[Any] = field(default_factory=list)

    def client(self, token: str | None = None) -> Any:
        """An hvac client for test-side checks (root token unless told); closed after the test."""
        client = hvac.Client(url=self.address, token=token or self.root_token, timeout=10)
        self._clients.append(client)
        return client

    def token_with_policy(self, name: str, hcl: str, **token_options: Any) -> str:
        """Write the ACL policy ``name`` and return a new token holding only it (and default)."""
        root = self.client()
        root.sys.create_or_update_policy(name=name, policy=hcl)
        created = root.auth.token.create(policies=[name], **token_options)
        token: str = created["auth"]["client_token"]
        return token

    def read_raw(self, path: str) -> dict[str, Any] | None:
        """The latest data at ``path`` in this test's mount, straight from Vault (None if none)."""
        try:
            answer = self.client().secrets.kv.v2.read_secret_version(
                path=path, mount_point=self.mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return None
        data: dict[str, Any] = answer["data"]["data"]
        return json.loads(json.dumps(data))  # a plain copy, detached from hvac's answer

    def close(self) -> None:
        for client in self._clients:
            client.adapter.close()
        self._clients.clear()


def _wait_mount_ready(root: Any, mount: str, timeout: float = 10.0) -> None:
    """A new KV v2 mount may answer "upgrading" for a moment: poll until a read is a plain 404."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            root.secrets.kv.v2.read_secret_version(
                path="readiness-probe", mount_point=mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return
        except hvac.exceptions.InvalidRequest:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # polling interval of a deadline-bounded wait


@pytest.fixture(scope="session")
def openbao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.OpenBaoServer]:
    server = servers.OpenBaoServer(tmp_path_factory.mktemp("openbao-home"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vault(openbao_server: servers.OpenBaoServer) -> Iterator[VaultFixture]:
    fixture = VaultFixture(
        address=openbao_server.address,
        root_token=openbao_server.root_token,
        mount=f"kv{next(_mount_numbers)}",
        server=openbao_server,
    )
    root = fixture.client()
    root.sys.enable_secrets_engine(backend_type="kv", path=fixture.mount, options={"version": "2"})
    _wait_mount_ready(root, fixture.mount)
    try:
        yield fixture
    finally:
        root.sys.disable_secrets_engine(path=fixture.mount)
        fixture.close()
