"""Shared fixtures: the real servers (moto's IAM server with authentication, OpenBao)."""

pytest_plugins = [
    "tests.support.moto_server",
    "tests.support.openbao",
    "tests.support.faultproxy_fixtures",
]
