"""pytest fixtures for moto's IAM server with authentication enforced.

``moto_server`` is one process for the whole session; ``iam_admin`` gives each test a wiped
server and a fresh allow-all admin key.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import servers


@pytest.fixture(scope="session")
def moto_server() -> Iterator[servers.MotoServer]:
    server = servers.MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def iam_admin(moto_server: servers.MotoServer) -> servers.MotoAdmin:
    return moto_server.bootstrap_admin()
