"""pytest fixtures for the IAM fault proxy (:mod:`tests.support.faultproxy`).

``iam_proxy`` is a started :class:`FaultProxy` in front of the session's moto server, one per test
(after ``iam_admin`` has wiped moto), stopped after the test; a test that leaves an unexpected
failure inside the proxy fails at teardown. ``iam_proxy_admin`` is the test's admin identity with
its endpoint pointed at the proxy, so ``iam_proxy_admin.client()`` goes through the rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from tests.support import servers
from tests.support.faultproxy import FaultProxy


@pytest.fixture
def iam_proxy(
    moto_server: servers.MotoServer, iam_admin: servers.MotoAdmin
) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_server.endpoint)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
    if proxy.errors:
        pytest.fail(f"the fault proxy failed inside: {proxy.errors!r}")


@pytest.fixture
def iam_proxy_admin(iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin) -> servers.MotoAdmin:
    return dataclasses.replace(iam_admin, endpoint=iam_proxy.endpoint)
