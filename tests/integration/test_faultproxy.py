"""The IAM fault proxy (tests/support/faultproxy.py) in front of moto's server, auth enforced.

Each rule is proved with boto3 clients pointed at the proxy, and checked against moto directly
(the admin's own client, which bypasses the proxy) to tell what took effect upstream.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from rotator import model
from rotator.adapters import eim
from tests.support import servers
from tests.support.faultproxy import (
    DROP_RESPONSE,
    FAULTS,
    Call,
    FaultProxy,
    parse_request,
)

ALLOW_ALL = json.dumps(servers.MOTO_ADMIN_POLICY)
NO_ANSWER = (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


ClientFactory = Callable[..., Any]


@pytest.fixture
def clients() -> Iterator[ClientFactory]:
    """boto3 clients (one attempt, short timeouts unless told), all closed after the test."""
    made: list[Any] = []

    def make(
        endpoint: str,
        key_id: str,
        secret: str,
        service: str = "iam",
        attempts: int = 1,
        read_timeout: float = 20.0,
    ) -> Any:
        new_client: Any = boto3.client  # the service is a plain str here
        client = new_client(
            service,
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=5,
                read_timeout=read_timeout,
            ),
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def direct(iam_admin: servers.MotoAdmin, clients: ClientFactory) -> Any:
    """The admin's client straight to moto: what really happened upstream."""
    return clients(iam_admin.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)


@pytest.fixture
def via(iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin, clients: ClientFactory) -> Any:
    """The admin's client through the test's proxy."""
    return clients(iam_proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)


@pytest.fixture
def make_proxy(moto_server: servers.MotoServer, iam_admin: servers.MotoAdmin) -> Iterator[Any]:
    """Extra proxies in front of the test's moto (own clock, OUTSCALE mode...), all stopped."""
    made: list[FaultProxy] = []

    def make(**options: Any) -> FaultProxy:
        proxy = FaultProxy(moto_server.endpoint, **options)
        proxy.start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()
    assert all(not proxy.errors for proxy in made), [proxy.errors for proxy in made]


def user_with_key(direct: Any, name: str) -> tuple[str, str]:
    """A user allowed everything, with one key made straight at moto (the proxy never saw it)."""
    direct.create_user(UserName=name)
    direct.put_user_policy(UserName=name, PolicyName="allow-all", PolicyDocument=ALLOW_ALL)
    key = direct.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def error_of(excinfo: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> tuple[str, int]:
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def key_ids(direct: Any, user: str) -> list[str]:
    return [k["AccessKeyId"] for k in direct.list_access_keys(UserName=user)["AccessKeyMetadata"]]


def user_exists(direct: Any, name: str) -> bool:
    try:
        direct.get_user(UserName=name)
    except direct.exceptions.NoSuchEntityException:
        return False
    return True


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]


# --- pass-through and identification -------------------------------------------------------


def test_without_rules_a_full_key_cycle_passes_through_unchanged(
    iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin, via: Any, direct: Any
) -> None:
    admin = iam_admin.access_key_id
    via.create_user(UserName="u")
    created = via.create_access_key(UserName="u")["AccessKey"]
    listed = via.list_access_keys(UserName="u")
    via.update_access_key(UserName="u", AccessKeyId=created["AccessKeyId"], Status="Inactive")
    after_update = via.list_access_keys(UserName="u")["AccessKeyMetadata"]
    via.delete_access_key(UserName="u", AccessKeyId=created["AccessKeyId"])
    users = via.list_users()

    assert created["UserName"] == "u" and created["SecretAccessKey"]
    assert listed["AccessKeyMetadata"] == [
        {
            "UserName": "u",
            "AccessKeyId": created["AccessKeyId"],
            "Status": "Active",
            "CreateDate": created["CreateDate"],
        }
    ]
    assert after_update[0]["Status"] == "Inactive"
    assert key_ids(direct, "u") == []
    assert users["IsTruncated"] is False  # moto's pagination markers are left alone
    assert users["Users"] == direct.list_users()["Users"]
    assert iam_proxy.calls == [
        Call("CreateUser", admin, 200),
        Call("CreateAccessKey", admin, 200),
        Call("ListAccessKeys", admin, 200),
        Call("UpdateAccessKey", admin, 200),
        Call("ListAccessKeys", admin, 200),
        Call("DeleteAccessKey", admin, 200),
        Call("ListUsers", admin, 200),
    ]
    assert iam_proxy.count("ListAccessKeys") == 2
    assert iam_proxy.count(status=200) == 7


def test_errors_and_other_services_pass_through_with_their_codes(
    iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin, via: Any, clients: ClientFactory
) -> None:
    admin, secret = iam_admin.access_key_id, iam_admin.secret_access_key
    sts = clients(iam_proxy.endpoint, admin, secret, service="sts")
    ec2 = clients(iam_proxy.endpoint, admin, secret, service="ec2")
    wrong_secret = clients(iam_proxy.endpoint, admin, "not-the-secret")
    unknown = clients(iam_proxy.endpoint, "AKIAUNKNOWNUNKNOWN00", "x")

    with pytest.raises(botocore.exceptions.ClientError) as missing:
        via.get_user(UserName="missing")
    with pytest.raises(botocore.exceptions.ClientError) as bad_signature:
        wrong_secret.list_users()
    with pytest.raises(botocore.exceptions.ClientError) as bad_key:
        unknown.list_users()
    identity = sts.get_caller_identity()
    regions = ec2.describe_regions()["Regions"]

    assert error_of(missing) == ("NoSuchEntity", 404)
    assert error_of(bad_signature) == ("SignatureDoesNotMatch", 403)
    assert error_of(bad_key) == ("InvalidClientTokenId", 403)
    assert identity["Arn"].endswith(":user/rotator-admin")
    assert regions
    assert iam_proxy.calls == [
        Call("GetUser", admin, 404),
        Call("ListUsers", admin, 403),
        Call("ListUsers", "AKIAUNKNOWNUNKNOWN00", 403),
        Call("GetCallerIdentity", admin, 200),
        Call("DescribeRegions", admin, 200),
    ]


def test_requests_are_identified_from_the_form_query_and_credential_scope() -> None:
    auth = (
        "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20260101/us-east-1/sts/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=abc"
    )
    form = parse_request(
        "POST",
        "/",
        [
            ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
            ("Authorization", auth),
        ],
        b"Action=GetCallerIdentity&Version=2011-06-15",
    )
    query = parse_request(
        "GET",
        "/?Action=ListUsers&X-Amz-Credential=AKIAQUERY%2F20260101%2Fus-east-1%2Fiam%2Faws4_request",
        [],
        b"",
    )
    unsigned = parse_request("GET", "/moto-api/", [], b"")

    assert (form.service, form.action, form.key_id) == ("sts", "GetCallerIdentity", "AKIAEXAMPLE")
    assert (query.service, query.action, query.key_id) == ("iam", "ListUsers", "AKIAQUERY")
    assert (unsigned.action, unsigned.key_id) == ("", "")


# --- young keys ----------------------------------------------------------------------------


def test_a_young_key_is_refused_until_it_is_old_enough(
    make_proxy: Any, iam_admin: servers.MotoAdmin, clients: ClientFactory, direct: Any
) -> None:
    clock = FakeClock()
    proxy = make_proxy(clock=clock)
    rule = proxy.reject_young_keys(15)
    via = clients(proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)
    direct.create_user(UserName="u")
    direct.put_user_policy(UserName="u", PolicyName="allow-all", PolicyDocument=ALLOW_ALL)
    new = via.create_access_key(UserName="u")["AccessKey"]
    young = clients(proxy.endpoint, new["AccessKeyId"], new["SecretAccessKey"])

    with pytest.raises(botocore.exceptions.ClientError) as at_once:
        young.get_user()
    via.list_users()  # the admin key was never seen created: old
    clock.advance(14.9)
    with pytest.raises(botocore.exceptions.ClientError) as almost:
        young.get_user()
    clock.advance(0.2)
    answer = young.get_user()

    assert error_of(at_once) == ("InvalidClientTokenId", 403)
    assert error_of(almost) == ("InvalidClientTokenId", 403)
    assert answer["User"]["UserName"] == "u"
    assert rule.hits == 2
    assert proxy.count("GetUser", key_id=new["AccessKeyId"], status=403) == 2


def test_a_young_key_is_accepted_once_the_real_time_has_passed(
    iam_proxy: FaultProxy, via: Any, direct: Any, clients: ClientFactory
) -> None:
    iam_proxy.reject_young_keys(3.0)  # seconds: room for a loaded machine's first call
    direct.create_user(UserName="u")
    direct.put_user_policy(UserName="u", PolicyName="allow-all", PolicyDocument=ALLOW_ALL)
    created_at = time.monotonic()
    new = via.create_access_key(UserName="u")["AccessKey"]
    young = clients(iam_proxy.endpoint, new["AccessKeyId"], new["SecretAccessKey"])

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        young.get_user()
    refused_after = time.monotonic() - created_at
    time.sleep(max(0.0, created_at + 3.2 - time.monotonic()))  # the key's age is the point
    answer = young.get_user()

    assert refused_after < 3.0, "the machine was too slow for this check to mean anything"
    assert error_of(refused) == ("InvalidClientTokenId", 403)
    assert answer["User"]["UserName"] == "u"


def test_the_young_key_rule_is_limited_by_action_count_key_and_removal(
    make_proxy: Any, iam_admin: servers.MotoAdmin, clients: ClientFactory, direct: Any
) -> None:
    proxy = make_proxy(clock=FakeClock())
    via = clients(proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)
    direct.create_user(UserName="u")
    direct.put_user_policy(UserName="u", PolicyName="allow-all", PolicyDocument=ALLOW_ALL)
    first = via.create_access_key(UserName="u")["AccessKey"]
    second = via.create_access_key(UserName="u")["AccessKey"]
    one = clients(proxy.endpoint, first["AccessKeyId"], first["SecretAccessKey"])
    one_sts = clients(proxy.endpoint, first["AccessKeyId"], first["SecretAccessKey"], "sts")
    two = clients(proxy.endpoint, second["AccessKeyId"], second["SecretAccessKey"])

    once = proxy.reject_young_keys(60, action="GetUser", key_id=first["AccessKeyId"], count=1)
    one_sts.get_caller_identity()  # another action: not refused
    two.get_user()  # another key: not refused
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        one.get_user()
    one.get_user()  # the count is used up
    removed = proxy.reject_young_keys(60, key_id=second["AccessKeyId"])
    with pytest.raises(botocore.exceptions.ClientError):
        two.get_user()
    removed.remove()
    two.get_user()

    assert error_of(refused) == ("InvalidClientTokenId", 403)
    assert once.exhausted and once.hits == 1
    assert removed.hits == 1 and removed not in proxy.rules


def test_a_young_key_is_refused_by_ec2_as_auth_failure(
    make_proxy: Any, iam_admin: servers.MotoAdmin, clients: ClientFactory, direct: Any
) -> None:
    clock = FakeClock()
    proxy = make_proxy(clock=clock)
    proxy.reject_young_keys(15)
    via = clients(proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)
    direct.create_user(UserName="u")
    direct.put_user_policy(UserName="u", PolicyName="allow-all", PolicyDocument=ALLOW_ALL)
    new = via.create_access_key(UserName="u")["AccessKey"]
    ec2 = clients(proxy.endpoint, new["AccessKeyId"], new["SecretAccessKey"], service="ec2")

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        ec2.describe_regions()
    clock.advance(15)

    assert error_of(refused) == ("AuthFailure", 401)
    assert ec2.describe_regions()["Regions"]


# --- injected errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "code", "status"),
    [
        ("throttling", "Throttling", 400),
        ("too_many_requests", "RequestLimitExceeded", 429),
        ("unavailable", "ServiceUnavailable", 503),
        ("internal", "InternalFailure", 500),
        ("limit_exceeded", "LimitExceeded", 409),
        ("access_denied", "AccessDenied", 403),
    ],
)
def test_an_injected_error_is_answered_without_forwarding(
    iam_proxy: FaultProxy,
    iam_admin: servers.MotoAdmin,
    via: Any,
    direct: Any,
    fault: str,
    code: str,
    status: int,
) -> None:
    rule = iam_proxy.inject(fault, action="CreateUser")

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        via.create_user(UserName="u")

    assert error_of(refused) == (code, status)
    assert refused.value.response["Error"]["Message"] == FAULTS[fault].message
    assert not user_exists(direct, "u")
    assert rule.hits == 1
    assert iam_proxy.calls == [Call("CreateUser", iam_admin.access_key_id, status)]


def test_an_injected_error_can_be_spelled_out(iam_proxy: FaultProxy, via: Any) -> None:
    iam_proxy.inject(action="ListUsers", status=400, code="ValidationError", message="bad name")

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        via.list_users()

    assert error_of(refused) == ("ValidationError", 400)
    assert refused.value.response["Error"]["Message"] == "bad name"


def test_injected_errors_are_limited_by_action_count_and_key(
    iam_proxy: FaultProxy, via: Any, direct: Any, clients: ClientFactory
) -> None:
    other_id, other_secret = user_with_key(direct, "other")
    other = clients(iam_proxy.endpoint, other_id, other_secret)
    iam_proxy.inject("throttling", action="CreateUser", count=2)
    denied = iam_proxy.inject("access_denied", key_id=other_id)

    via.list_users()  # another action
    outcomes = []
    for _ in range(3):
        try:
            via.create_user(UserName="u")
            outcomes.append("created")
        except botocore.exceptions.ClientError as exc:
            outcomes.append(exc.response["Error"]["Code"])
    with pytest.raises(botocore.exceptions.ClientError) as other_refused:
        other.list_users()
    denied.remove()
    other.list_users()

    assert outcomes == ["Throttling", "Throttling", "created"]
    assert error_of(other_refused) == ("AccessDenied", 403)
    assert user_exists(direct, "u")


def test_rules_count_exactly_under_concurrent_calls(
    iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin, clients: ClientFactory
) -> None:
    rule = iam_proxy.inject("throttling", action="GetUser", count=5)
    callers = [
        clients(iam_proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)
        for _ in range(8)
    ]
    start = threading.Barrier(len(callers))
    outcomes: list[str] = []
    outcomes_lock = threading.Lock()

    def run(client: Any) -> None:
        start.wait(10)
        mine = _run_calls(client, 10)
        with outcomes_lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=run, args=(c,), name="test-caller") for c in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert sorted(set(outcomes)) == ["Throttling", "ok"]
    assert outcomes.count("Throttling") == 5 and len(outcomes) == 80
    assert rule.hits == 5 and rule.exhausted
    assert iam_proxy.count("GetUser", status=400) == 5 and len(iam_proxy.calls) == 80


def test_botocore_retries_an_injected_throttle_and_the_log_shows_each_attempt(
    iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin, clients: ClientFactory
) -> None:
    retrying = clients(
        iam_proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key, attempts=3
    )
    iam_proxy.inject("unavailable", action="ListUsers", count=2)

    answer = retrying.list_users()

    assert answer["ResponseMetadata"]["RetryAttempts"] == 2
    assert [c.status for c in iam_proxy.calls] == [503, 503, 200]


# --- dropped answers -----------------------------------------------------------------------


def test_a_dropped_answer_took_effect_upstream_while_the_client_got_an_error(
    iam_proxy: FaultProxy, via: Any, direct: Any
) -> None:
    direct.create_user(UserName="u")
    rule = iam_proxy.drop_response(action="CreateAccessKey")

    with pytest.raises(NO_ANSWER):
        via.create_access_key(UserName="u")
    after_drop = key_ids(direct, "u")
    second = via.create_access_key(UserName="u")["AccessKey"]  # count=1: answered again

    assert len(after_drop) == 1
    assert set(key_ids(direct, "u")) == {after_drop[0], second["AccessKeyId"]}
    assert [c.status for c in iam_proxy.calls] == [None, 200]
    assert iam_proxy.count("CreateAccessKey", unanswered=True) == 1
    assert rule.exhausted


# --- holds ---------------------------------------------------------------------------------


def _call_in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="test-caller")
    thread.start()
    return thread, outcome


def test_a_held_call_waits_in_the_proxy_until_released(
    iam_proxy: FaultProxy, via: Any, direct: Any
) -> None:
    hold = iam_proxy.hold(action="CreateUser")
    thread, outcome = _call_in_thread(lambda: via.create_user(UserName="u"))

    assert hold.wait_arrived(10)
    assert not user_exists(direct, "u")  # not forwarded yet
    assert iam_proxy.count("ListUsers") == 0
    via.list_users()  # other calls go on meanwhile
    assert thread.is_alive() and not outcome
    hold.release()
    thread.join(20)

    assert not thread.is_alive()
    assert outcome["result"]["User"]["UserName"] == "u"
    assert hold.wait_finished(10)
    assert user_exists(direct, "u")
    assert iam_proxy.calls[-1].action == "CreateUser" and iam_proxy.calls[-1].status == 200


def test_a_hold_released_without_forwarding_fails_the_call(
    iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin, via: Any, direct: Any
) -> None:
    hold = iam_proxy.hold(action="CreateUser")
    thread, outcome = _call_in_thread(lambda: via.create_user(UserName="u"))
    assert hold.wait_arrived(10)

    hold.release(forward=False)
    thread.join(20)

    assert isinstance(outcome.get("error"), NO_ANSWER)
    assert not user_exists(direct, "u")
    assert iam_proxy.calls == [Call("CreateUser", iam_admin.access_key_id, None)]


def test_a_client_killed_while_held_leaves_the_call_to_the_test(
    iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin, direct: Any
) -> None:
    direct.create_user(UserName="victim")
    hold = iam_proxy.hold(action="CreateAccessKey")
    script = (
        "import boto3, os\n"
        "boto3.client('iam', endpoint_url=os.environ['PROXY'], region_name='us-east-1')"
        ".create_access_key(UserName='victim')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "PROXY": iam_proxy.endpoint,
        "AWS_ACCESS_KEY_ID": iam_admin.access_key_id,
        "AWS_SECRET_ACCESS_KEY": iam_admin.secret_access_key,
    }
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        assert hold.wait_arrived(60)
        process.send_signal(signal.SIGKILL)
        assert process.wait(20) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(20)
    assert key_ids(direct, "victim") == []  # the client died before the call was forwarded

    hold.release()  # the call still reaches IAM, as one sent just before a crash would
    assert hold.wait_finished(20)

    assert len(key_ids(direct, "victim")) == 1


def test_stop_fails_held_calls_closes_idle_connections_and_leaves_no_thread(
    moto_server: servers.MotoServer, iam_admin: servers.MotoAdmin, clients: ClientFactory
) -> None:
    proxy = FaultProxy(moto_server.endpoint)
    with proxy:
        via = clients(proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)
        hold = proxy.hold(action="ListUsers")
        thread, outcome = _call_in_thread(via.list_users)
        assert hold.wait_arrived(10)
        port = proxy.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            assert proxy.wait_connections(2)  # the held call's and the idle one, both served
            assert len(proxy_threads()) == 3  # the accept loop and one thread per connection
            proxy.stop()
            assert idle.recv(1) == b""  # the proxy closed it
        thread.join(20)

    assert isinstance(outcome.get("error"), NO_ANSWER)
    assert proxy_threads() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert proxy.errors == []


# --- OUTSCALE mode -------------------------------------------------------------------------


@pytest.fixture
def outscale(make_proxy: Any) -> FaultProxy:
    proxy: FaultProxy = make_proxy(outscale=True, clock=FakeClock(), lock_period=30)
    return proxy


@pytest.fixture
def via_outscale(outscale: FaultProxy, iam_admin: servers.MotoAdmin, clients: ClientFactory) -> Any:
    return clients(outscale.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)


def test_outscale_create_access_key_names_the_user_by_orn(
    outscale: FaultProxy, via_outscale: Any, direct: Any
) -> None:
    direct.create_user(UserName="u")

    created = via_outscale.create_access_key(UserName="u")["AccessKey"]
    listed = via_outscale.list_access_keys(UserName="u")["AccessKeyMetadata"]
    outscale.set_outscale(account="987654321098")
    again = via_outscale.create_access_key(UserName="u")["AccessKey"]

    assert created["UserName"] == "orn:ows:idauth::123456789012:user/u"
    assert listed[0]["UserName"] == "u"  # ListAccessKeys keeps the plain name, as EIM does
    assert again["UserName"] == "orn:ows:idauth::987654321098:user/u"


def test_outscale_no_such_entity_and_access_denied_are_status_400(
    outscale: FaultProxy, via_outscale: Any, direct: Any, clients: ClientFactory
) -> None:
    direct.create_user(UserName="nobody")  # no policy: every IAM call is denied
    key = direct.create_access_key(UserName="nobody")["AccessKey"]
    denied_client = clients(outscale.endpoint, key["AccessKeyId"], key["SecretAccessKey"])

    with pytest.raises(botocore.exceptions.ClientError) as missing_user:
        via_outscale.get_user(UserName="missing")
    with pytest.raises(botocore.exceptions.ClientError) as missing_key:
        via_outscale.delete_access_key(UserName="missing", AccessKeyId="AKIANOTHERE000000000")
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        denied_client.list_users()
    outscale.set_outscale(False)
    with pytest.raises(botocore.exceptions.ClientError) as moto_says:
        via_outscale.get_user(UserName="missing")

    assert error_of(missing_user) == ("NoSuchEntity", 400)
    assert error_of(missing_key) == ("NoSuchEntity", 400)
    assert error_of(denied) == ("AccessDenied", 400)
    assert error_of(moto_says) == ("NoSuchEntity", 404)


def test_outscale_lists_carry_no_pagination_markers(
    outscale: FaultProxy, via_outscale: Any, direct: Any
) -> None:
    for name in ("a", "b", "c"):
        direct.create_policy(PolicyName=name, PolicyDocument=ALLOW_ALL)

    from_moto = direct.list_policies(Scope="Local", MaxItems=1)
    from_eim = via_outscale.list_policies(Scope="Local", MaxItems=1)
    paginator = via_outscale.get_paginator("list_policies")
    pages = list(paginator.paginate(Scope="Local", PaginationConfig={"PageSize": 1}))
    users = via_outscale.list_users()

    assert from_moto["IsTruncated"] is True and from_moto["Marker"]
    assert "IsTruncated" not in from_eim and "Marker" not in from_eim
    assert [p["PolicyName"] for p in from_eim["Policies"]] == ["a"]
    assert len(pages) == 1  # a paginator reads "no marker" as the last page
    assert "IsTruncated" not in users and users["Users"]


@pytest.mark.parametrize(
    ("operation", "arguments"),
    [
        ("get_access_key_last_used", {"AccessKeyId": "AKIAANYANYANYANY0000"}),
        ("tag_user", {"UserName": "u", "Tags": [{"Key": "team", "Value": "ops"}]}),
        ("untag_user", {"UserName": "u", "TagKeys": ["team"]}),
        ("list_user_tags", {"UserName": "u"}),
        ("tag_policy", {"PolicyArn": "arn:aws:iam::123456789012:policy/p", "Tags": []}),
    ],
)
def test_outscale_calls_eim_lacks_are_invalid_action(
    outscale: FaultProxy,
    via_outscale: Any,
    direct: Any,
    operation: str,
    arguments: dict[str, Any],
) -> None:
    direct.create_user(UserName="u")

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        getattr(via_outscale, operation)(**arguments)

    assert error_of(refused) == ("InvalidAction", 400)
    assert direct.list_user_tags(UserName="u")["Tags"] == []  # nothing reached moto


def test_outscale_key_quota_refuses_before_moto_does(
    make_proxy: Any, iam_admin: servers.MotoAdmin, clients: ClientFactory, direct: Any
) -> None:
    proxy = make_proxy(outscale=True, key_quota=1)
    via = clients(proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)
    direct.create_user(UserName="u")
    direct.create_user(UserName="made-behind")
    direct.create_access_key(UserName="made-behind")

    first = via.create_access_key(UserName="u")["AccessKey"]
    with pytest.raises(botocore.exceptions.ClientError) as second:
        via.create_access_key(UserName="u")
    via.delete_access_key(UserName="u", AccessKeyId=first["AccessKeyId"])
    replacement = via.create_access_key(UserName="u")["AccessKey"]
    via.list_access_keys(UserName="made-behind")  # the proxy learns the key made behind it
    with pytest.raises(botocore.exceptions.ClientError) as behind:
        via.create_access_key(UserName="made-behind")

    assert error_of(second) == ("LimitExceeded", 409)
    assert second.value.response["Error"]["Message"].endswith("AccessKeysPerUser: 1")
    assert key_ids(direct, "u") == [replacement["AccessKeyId"]]
    assert error_of(behind) == ("LimitExceeded", 409)
    assert len(key_ids(direct, "made-behind")) == 1


def test_a_key_quota_above_moto_s_two_is_refused_with_the_reason(
    moto_server: servers.MotoServer,
) -> None:
    with pytest.raises(ValueError, match="moto itself refuses a third key"):
        FaultProxy(moto_server.endpoint, outscale=True, key_quota=3)
    proxy = FaultProxy(moto_server.endpoint)
    with pytest.raises(ValueError, match="only 0, 1 or 2"):
        proxy.set_outscale(key_quota=10)
    assert proxy.outscale is False


def test_outscale_refuses_inactive_keys_which_moto_accepts(
    iam_proxy: FaultProxy, via: Any, direct: Any, clients: ClientFactory
) -> None:
    key_id, secret = user_with_key(direct, "u")
    user = clients(iam_proxy.endpoint, key_id, secret)

    via.update_access_key(UserName="u", AccessKeyId=key_id, Status="Inactive")
    moto_accepts = user.get_user()["User"]["UserName"]
    iam_proxy.set_outscale(True)
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        user.get_user()
    via.update_access_key(UserName="u", AccessKeyId=key_id, Status="Active")
    accepted_again = user.get_user()["User"]["UserName"]
    direct.update_access_key(UserName="u", AccessKeyId=key_id, Status="Inactive")
    via.list_access_keys(UserName="u")  # the proxy learns states from listings too
    with pytest.raises(botocore.exceptions.ClientError) as learnt:
        user.get_user()

    assert moto_accepts == "u"
    assert error_of(refused) == ("InvalidClientTokenId", 403)
    assert accepted_again == "u"
    assert error_of(learnt) == ("InvalidClientTokenId", 403)


def _fail_signatures(client: Any, times: int) -> list[str]:
    codes = []
    for _ in range(times):
        with pytest.raises(botocore.exceptions.ClientError) as failed:
            client.get_user()
        codes.append(failed.value.response["Error"]["Code"])
    return codes


def test_outscale_locks_a_key_after_four_failures_in_a_row_then_lets_it_in(
    make_proxy: Any, iam_admin: servers.MotoAdmin, clients: ClientFactory, direct: Any
) -> None:
    clock = FakeClock()
    proxy = make_proxy(outscale=True, clock=clock, lock_period=30)
    key_id, secret = user_with_key(direct, "u")
    good = clients(proxy.endpoint, key_id, secret)
    bad = clients(proxy.endpoint, key_id, "wrong-secret")
    admin = clients(proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)

    codes = _fail_signatures(bad, 4)
    with pytest.raises(botocore.exceptions.ClientError) as locked:
        good.get_user()
    admin.list_users()  # another key is not locked
    clock.advance(29.9)
    with pytest.raises(botocore.exceptions.ClientError) as still_locked:
        good.get_user()
    forwarded_while_locked = proxy.count("GetUser", key_id=key_id)
    clock.advance(0.2)
    answer = good.get_user()

    assert codes == ["SignatureDoesNotMatch"] * 4
    assert error_of(locked) == ("InvalidClientTokenId", 403)
    assert "locked" in locked.value.response["Error"]["Message"]
    assert error_of(still_locked) == ("InvalidClientTokenId", 403)
    assert forwarded_while_locked == 6
    assert answer["User"]["UserName"] == "u"
    assert not proxy.locked(key_id)


def test_outscale_lockout_counts_failures_in_a_row_only(
    outscale: FaultProxy, direct: Any, clients: ClientFactory
) -> None:
    key_id, secret = user_with_key(direct, "u")
    good = clients(outscale.endpoint, key_id, secret)
    bad = clients(outscale.endpoint, key_id, "wrong-secret")

    _fail_signatures(bad, 3)
    good.get_user()
    _fail_signatures(bad, 3)

    assert not outscale.locked(key_id)
    assert good.get_user()["User"]["UserName"] == "u"


def test_outscale_lock_grows_with_every_further_four_failures_up_to_the_maximum(
    make_proxy: Any, direct: Any, clients: ClientFactory
) -> None:
    clock = FakeClock()
    proxy = make_proxy(outscale=True, clock=clock, lock_period=30, lock_max=50)
    key_id, _ = user_with_key(direct, "u")
    bad = clients(proxy.endpoint, key_id, "wrong-secret")

    _fail_signatures(bad, 4)
    clock.advance(30)
    first_lock_over = not proxy.locked(key_id)
    _fail_signatures(bad, 4)  # still in a row: the lock is now 2 x 30 s, capped at 50 s
    clock.advance(49.9)
    second_lock_on = proxy.locked(key_id)
    clock.advance(0.2)

    assert first_lock_over
    assert second_lock_on
    assert not proxy.locked(key_id)


def test_outscale_young_key_refusals_count_toward_the_lockout(
    make_proxy: Any, iam_admin: servers.MotoAdmin, clients: ClientFactory, direct: Any
) -> None:
    clock = FakeClock()
    proxy = make_proxy(outscale=True, clock=clock)  # default lock period: 60 s
    proxy.reject_young_keys(15)
    via = clients(proxy.endpoint, iam_admin.access_key_id, iam_admin.secret_access_key)
    direct.create_user(UserName="u")
    direct.put_user_policy(UserName="u", PolicyName="allow-all", PolicyDocument=ALLOW_ALL)
    new = via.create_access_key(UserName="u")["AccessKey"]
    eager = clients(proxy.endpoint, new["AccessKeyId"], new["SecretAccessKey"])

    codes = _fail_signatures(eager, 4)  # a verifier in a tight loop
    clock.advance(16)  # the key has propagated, but it is locked out
    with pytest.raises(botocore.exceptions.ClientError) as locked:
        eager.get_user()
    clock.advance(44.1)
    answer = eager.get_user()

    assert codes == ["InvalidClientTokenId"] * 4
    assert "locked" in locked.value.response["Error"]["Message"]
    assert answer["User"]["UserName"] == "u"


def test_outscale_lock_period_in_real_time(
    make_proxy: Any, direct: Any, clients: ClientFactory
) -> None:
    proxy = make_proxy(outscale=True, lock_period=3.0)  # seconds: room for a loaded machine
    key_id, secret = user_with_key(direct, "u")
    good = clients(proxy.endpoint, key_id, secret)
    bad = clients(proxy.endpoint, key_id, "wrong-secret")

    _fail_signatures(bad, 4)
    locked_at = time.monotonic()
    with pytest.raises(botocore.exceptions.ClientError) as locked:
        good.get_user()
    time.sleep(max(0.0, locked_at + 3.1 - time.monotonic()))  # the lock's length is the point
    answer = good.get_user()

    assert "locked" in locked.value.response["Error"]["Message"]
    assert answer["User"]["UserName"] == "u"


# --- random faults -------------------------------------------------------------------------


def _run_calls(client: Any, calls: int) -> list[str]:
    outcomes = []
    for _ in range(calls):
        try:
            client.get_user()
            outcomes.append("ok")
        except botocore.exceptions.ClientError as exc:
            outcomes.append(exc.response["Error"]["Code"])
        except NO_ANSWER:
            outcomes.append(DROP_RESPONSE)
    return outcomes


def test_random_faults_hit_about_the_rate_and_repeat_with_the_seed(
    iam_proxy: FaultProxy, via: Any
) -> None:
    first = iam_proxy.random_faults(rate=0.1, seed=1234, kinds=("throttling", "unavailable"))
    first_run = _run_calls(via, 300)
    first.remove()
    second = iam_proxy.random_faults(rate=0.1, seed=1234, kinds=("throttling", "unavailable"))
    second_run = _run_calls(via, 300)

    faults = [o for o in first_run if o != "ok"]
    assert 15 <= len(faults) <= 50  # binomial(300, 0.1): mean 30, sd 5.2
    assert set(faults) <= {"Throttling", "ServiceUnavailable"} and len(set(faults)) == 2
    assert len(first.injected) == len(faults) and first.seen == 300
    assert second_run == first_run and second.injected == first.injected


def test_random_faults_can_drop_answers_and_are_bounded_by_count(
    iam_proxy: FaultProxy, via: Any, direct: Any
) -> None:
    rule = iam_proxy.random_faults(rate=1.0, seed=1, kinds=(DROP_RESPONSE,), count=1)

    with pytest.raises(NO_ANSWER):
        via.create_user(UserName="u")
    via.create_user(UserName="v")

    assert user_exists(direct, "u") and user_exists(direct, "v")
    assert rule.injected == [("CreateUser", DROP_RESPONSE)]


def test_unknown_fault_names_and_remote_upstreams_are_refused(iam_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://eim.eu-west-2.outscale.com")
    with pytest.raises(ValueError, match="unknown fault"):
        iam_proxy.inject("gremlins")
    with pytest.raises(ValueError, match="unknown fault kinds"):
        iam_proxy.random_faults(kinds=("gremlins",))
    with pytest.raises(ValueError, match="status and code"):
        iam_proxy.inject(status=500)
    assert iam_proxy.rules == []


# --- rotator's own adapter through the proxy -----------------------------------------------


def adapter(proxy: FaultProxy, admin: servers.MotoAdmin) -> eim.EimIdentity:
    return eim.EimIdentity(
        region="us-east-1",
        endpoint_url=proxy.endpoint,
        credentials=(admin.access_key_id, model.Secret(admin.secret_access_key)),
        max_attempts=1,
    )


def test_rotator_adapter_works_through_the_proxy(
    iam_proxy: FaultProxy, iam_admin: servers.MotoAdmin, direct: Any
) -> None:
    identity = adapter(iam_proxy, iam_admin)
    identity.create_user("watcher_1")

    before = identity.list_keys("watcher_1")
    new = identity.create_key("watcher_1")
    after = identity.list_keys("watcher_1")

    assert before == []
    assert [k.key_id for k in after] == [new.key_id] == key_ids(direct, "watcher_1")
    assert after[0].status is model.KeyStatus.ACTIVE
    assert identity.verify_key(new.key_id, new.secret).outcome is model.VerifyOutcome.VALID
    assert iam_proxy.count("CreateAccessKey", status=200) == 1


def test_rotator_adapter_copes_with_outscale_mode_and_young_keys(
    outscale: FaultProxy, iam_admin: servers.MotoAdmin, direct: Any
) -> None:
    clock = outscale.clock
    assert isinstance(clock, FakeClock)
    outscale.reject_young_keys(15)
    identity = adapter(outscale, iam_admin)
    identity.create_user("watcher_1")

    new = identity.create_key("watcher_1")
    listed = identity.list_keys("watcher_1")
    propagating = identity.verify_key(new.key_id, new.secret)
    clock.advance(15)
    verified = identity.verify_key(new.key_id, new.secret)
    missing = identity.get_user("nobody")
    present = identity.get_user("watcher_1")

    assert isinstance(new, model.NewKey) and new.key_id in key_ids(direct, "watcher_1")
    assert [k.key_id for k in listed] == [new.key_id]
    assert propagating.outcome is model.VerifyOutcome.NOT_YET
    assert propagating.detail == "InvalidClientTokenId"
    assert verified.outcome is model.VerifyOutcome.VALID  # AccessDenied (400) proves the key
    assert missing is None
    assert present == model.User(name="watcher_1")
