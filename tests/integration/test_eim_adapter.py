"""EimIdentity against moto's IAM server with authentication enforced, and against a loopback
recorder where the wire itself is the thing checked (signing name, retries, EIM's error shape)."""

from __future__ import annotations

import http.server
import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rotator import errors, log, model
from rotator.adapters import eim
from tests.support import servers

SEED_DOCUMENT = {
    "Version": "2012-10-17",  # moto requires it; the seed's own document has none
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["ec2:Describe*", "elasticloadbalancing:Describe*"],
            "Resource": "*",
        }
    ],
}
SEED_DESCRIPTION = "Allow describe for every item"


def make_identity(
    admin: servers.MotoAdmin,
    *,
    key_id: str | None = None,
    secret: str | None = None,
    **options: Any,
) -> eim.EimIdentity:
    options.setdefault("max_attempts", 1)
    options.setdefault("connect_timeout", 2.0)
    options.setdefault("read_timeout", 5.0)
    return eim.EimIdentity(
        region=admin.region,
        endpoint_url=admin.endpoint,
        credentials=(
            key_id or admin.access_key_id,
            model.Secret(secret or admin.secret_access_key),
        ),
        **options,
    )


@pytest.fixture
def identity(iam_admin: servers.MotoAdmin) -> eim.EimIdentity:
    return make_identity(iam_admin)


@pytest.fixture
def seeded(identity: eim.EimIdentity) -> str:
    """The seed identity of the OUTSCALE tutorial; returns the policy ARN."""
    identity.create_group("monitoring")
    arn = identity.create_policy("monitoring", SEED_DESCRIPTION, SEED_DOCUMENT)
    identity.attach_group_policy("monitoring", arn)
    identity.create_user("watcher_1")
    identity.add_user_to_group("watcher_1", "monitoring")
    return arn


# --- identity ------------------------------------------------------------------------------


def test_seed_identity_is_created_and_observed_back(
    identity: eim.EimIdentity, seeded: str, iam_admin: servers.MotoAdmin
) -> None:
    group = identity.get_group("monitoring")
    policy = identity.get_policy("monitoring")
    user = identity.get_user("watcher_1")

    assert group == model.Group(name="monitoring", attached_policies=frozenset({"monitoring"}))
    assert policy is not None
    assert policy.arn == seeded
    assert policy.document == SEED_DOCUMENT
    assert policy.default_version_id == "v1"
    assert [(v.version_id, v.is_default) for v in policy.versions] == [("v1", True)]
    assert policy.versions[0].created.tzinfo is not None
    assert user == model.User(name="watcher_1", groups=frozenset({"monitoring"}))
    described = iam_admin.client().get_policy(PolicyArn=seeded)["Policy"]
    assert described["Description"] == SEED_DESCRIPTION


def test_a_policy_created_under_a_path_is_found_by_name(
    identity: eim.EimIdentity, iam_admin: servers.MotoAdmin
) -> None:
    arn = identity.create_policy("scoped", "", SEED_DOCUMENT, path="/rotator/")
    assert "/rotator/scoped" in arn
    found = identity.get_policy("scoped")
    assert found is not None and found.arn == arn
    assert iam_admin.client().get_policy(PolicyArn=arn)["Policy"]["Path"] == "/rotator/"


def test_creating_an_existing_group_is_already_exists(
    identity: eim.EimIdentity, seeded: str
) -> None:
    with pytest.raises(errors.EimAlreadyExists) as caught:
        identity.create_group("monitoring")
    assert caught.value.code == "EntityAlreadyExists"
    assert caught.value.action == "iam:CreateGroup"


def test_observations_return_none_when_the_entity_is_absent(identity: eim.EimIdentity) -> None:
    assert identity.get_group("monitoring") is None
    assert identity.get_policy("monitoring") is None
    assert identity.get_user("watcher_1") is None


def test_new_policy_version_becomes_default_and_the_old_one_can_be_deleted(
    identity: eim.EimIdentity, seeded: str
) -> None:
    wider = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["api:Read*"], "Resource": ["*"]}],
    }
    identity.create_policy_version(seeded, wider)

    after_create = identity.get_policy("monitoring")
    assert after_create is not None
    assert after_create.document == wider
    assert after_create.default_version_id == "v2"
    assert {(v.version_id, v.is_default) for v in after_create.versions} == {
        ("v1", False),
        ("v2", True),
    }

    identity.delete_policy_version(seeded, "v1")
    after_delete = identity.get_policy("monitoring")
    assert after_delete is not None
    assert [v.version_id for v in after_delete.versions] == ["v2"]
    assert after_delete.document == wider


# --- keys ----------------------------------------------------------------------------------


def test_key_lifecycle_create_list_deactivate_delete(
    identity: eim.EimIdentity, seeded: str
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    new = identity.create_key("watcher_1")

    listed = identity.list_keys("watcher_1")
    assert [(k.key_id, k.status) for k in listed] == [(new.key_id, model.KeyStatus.ACTIVE)]
    assert listed[0].created.utcoffset() == timedelta(0)
    assert before <= listed[0].created <= datetime.now(UTC) + timedelta(seconds=5)
    assert new.created.utcoffset() == timedelta(0)

    identity.set_key_status("watcher_1", new.key_id, model.KeyStatus.INACTIVE)
    assert [k.status for k in identity.list_keys("watcher_1")] == [model.KeyStatus.INACTIVE]

    identity.delete_key("watcher_1", new.key_id)
    assert identity.list_keys("watcher_1") == []


def test_deleting_an_absent_key_is_no_such_entity(identity: eim.EimIdentity, seeded: str) -> None:
    with pytest.raises(errors.EimNoSuchEntity):
        identity.delete_key("watcher_1", "AKIAEXAMPLENOTTHERE1")


def test_third_key_is_refused_with_quota_exceeded(identity: eim.EimIdentity, seeded: str) -> None:
    identity.create_key("watcher_1")
    second = identity.create_key("watcher_1")
    identity.set_key_status("watcher_1", second.key_id, model.KeyStatus.INACTIVE)

    with pytest.raises(errors.EimQuotaExceeded) as caught:
        identity.create_key("watcher_1")
    assert caught.value.code == "LimitExceeded"
    assert "iam:CreateAccessKey" in str(caught.value)
    assert len(identity.list_keys("watcher_1")) == 2


def test_the_account_comes_from_the_callers_arn_and_is_none_when_get_user_is_denied(
    identity: eim.EimIdentity, iam_admin: servers.MotoAdmin, seeded: str
) -> None:
    arn = iam_admin.client().get_user()["User"]["Arn"]
    assert identity.account() == arn.split(":")[4] and len(arn.split(":")[4]) == 12
    # a user without iam:GetUser: not known, and no error (rotator goes on without the check)
    new = identity.create_key("watcher_1")
    assert make_identity(iam_admin, key_id=new.key_id, secret=new.secret.reveal()).account() is None


# --- verification --------------------------------------------------------------------------


def test_fresh_key_of_a_user_without_iam_permission_verifies_valid(
    identity: eim.EimIdentity, seeded: str
) -> None:
    new = identity.create_key("watcher_1")

    result = identity.verify_key(new.key_id, new.secret)

    assert result == model.VerifyResult(model.VerifyOutcome.VALID, detail="AccessDenied")


def test_fresh_key_of_a_user_allowed_get_user_verifies_valid_without_detail(
    identity: eim.EimIdentity, iam_admin: servers.MotoAdmin
) -> None:
    # The admin's own key: GetUser succeeds outright.
    result = identity.verify_key(iam_admin.access_key_id, model.Secret(iam_admin.secret_access_key))
    assert result == model.VerifyResult(model.VerifyOutcome.VALID, detail="")


def test_verify_with_sts_get_caller_identity_is_valid(
    iam_admin: servers.MotoAdmin, seeded: str, identity: eim.EimIdentity
) -> None:
    new = identity.create_key("watcher_1")
    sts_verifier = make_identity(iam_admin, verify_action="sts:GetCallerIdentity")

    assert sts_verifier.verify_key(new.key_id, new.secret).outcome is model.VerifyOutcome.VALID


def test_deleted_key_verifies_not_yet_with_invalid_client_token_id(
    identity: eim.EimIdentity, seeded: str
) -> None:
    new = identity.create_key("watcher_1")
    identity.delete_key("watcher_1", new.key_id)

    result = identity.verify_key(new.key_id, new.secret)

    assert result == model.VerifyResult(model.VerifyOutcome.NOT_YET, detail="InvalidClientTokenId")


def test_wrong_secret_verifies_not_yet_with_signature_does_not_match(
    identity: eim.EimIdentity, seeded: str
) -> None:
    new = identity.create_key("watcher_1")

    result = identity.verify_key(new.key_id, model.Secret("x" * 40))

    assert result == model.VerifyResult(model.VerifyOutcome.NOT_YET, detail="SignatureDoesNotMatch")


def test_verify_signs_with_the_key_given_never_the_environment(
    identity: eim.EimIdentity,
    seeded: str,
    iam_admin: servers.MotoAdmin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Working admin credentials in the environment must not rescue a deleted key.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_admin.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_admin.secret_access_key)
    new = identity.create_key("watcher_1")
    identity.delete_key("watcher_1", new.key_id)

    assert identity.verify_key(new.key_id, new.secret).outcome is model.VerifyOutcome.NOT_YET


def test_credentials_none_uses_the_standard_boto3_chain(
    iam_admin: servers.MotoAdmin, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_admin.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_admin.secret_access_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    from_env = eim.EimIdentity(
        region=iam_admin.region, endpoint_url=iam_admin.endpoint, credentials=None, max_attempts=1
    )

    from_env.create_user("made_with_env_credentials")

    assert from_env.get_user("made_with_env_credentials") == model.User(
        name="made_with_env_credentials", groups=frozenset()
    )


@pytest.mark.parametrize("variable", ["AWS_PROFILE", "AWS_DEFAULT_PROFILE"])
def test_a_profile_the_machine_lacks_does_not_break_explicit_credentials_or_verification(
    iam_admin: servers.MotoAdmin,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, "work")  # often exported in an operator's shell
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    identity = make_identity(iam_admin)  # credentials as eim.credentials_file gives them

    identity.create_user("watcher_1")
    key = identity.create_key("watcher_1")

    assert [k.key_id for k in identity.list_keys("watcher_1")] == [key.key_id]
    assert identity.verify_key(key.key_id, key.secret).outcome is model.VerifyOutcome.VALID


def test_the_credential_chain_with_a_missing_profile_is_a_config_error_naming_aws_profile(
    iam_admin: servers.MotoAdmin, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "work")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))

    with pytest.raises(errors.ConfigError) as caught:
        eim.EimIdentity(region=iam_admin.region, endpoint_url=iam_admin.endpoint, credentials=None)

    assert "(work)" in str(caught.value)
    assert "unset AWS_PROFILE, or set eim.credentials_file" in str(caught.value)


# --- the rotator's own failures ------------------------------------------------------------


def test_admin_with_a_wrong_secret_gets_an_authentication_error(
    iam_admin: servers.MotoAdmin,
) -> None:
    wrong = "W" * 40
    rejected = make_identity(iam_admin, secret=wrong)

    with pytest.raises(errors.EimAuthenticationError) as caught:
        rejected.get_user("watcher_1")

    message = str(caught.value)
    assert caught.value.code == "SignatureDoesNotMatch"
    assert "eim.credentials_file" in message
    assert "eim.signing_name" in message
    assert wrong not in message
    assert iam_admin.secret_access_key not in message
    assert not caught.value.transient


def test_unknown_access_key_gets_an_authentication_error(iam_admin: servers.MotoAdmin) -> None:
    unknown = make_identity(iam_admin, key_id="AKIAUNKNOWNUNKNOWN00")

    with pytest.raises(errors.EimAuthenticationError) as caught:
        unknown.list_keys("watcher_1")
    assert caught.value.code == "InvalidClientTokenId"
    assert "eim.signing_name" not in str(caught.value)


def test_user_without_iam_permission_gets_access_denied_naming_the_permission(
    identity: eim.EimIdentity, seeded: str, iam_admin: servers.MotoAdmin
) -> None:
    key = identity.create_key("watcher_1")
    watcher = make_identity(iam_admin, key_id=key.key_id, secret=key.secret.reveal())

    with pytest.raises(errors.EimAccessDenied) as caught:
        watcher.create_user("intruder")

    message = str(caught.value)
    assert "iam:CreateUser" in message
    assert "rotator's own policy" in message
    assert caught.value.action == "iam:CreateUser"
    assert key.secret.reveal() not in message
    assert identity.get_user("intruder") is None


def test_unreachable_endpoint_gives_a_transient_error_quickly() -> None:
    endpoint = f"http://127.0.0.1:{servers.free_port()}"  # nothing listens there
    nowhere = eim.EimIdentity(
        region="us-east-1",
        endpoint_url=endpoint,
        credentials=("AKIAEXAMPLEEXAMPLE00", model.Secret("s" * 40)),
        connect_timeout=1.0,
        read_timeout=1.0,
        max_attempts=1,
    )
    started = time.monotonic()

    with pytest.raises(errors.EimTransientError) as caught:
        nowhere.list_keys("watcher_1")

    assert time.monotonic() - started < 5.0
    assert caught.value.transient
    assert endpoint in str(caught.value)
    assert "s" * 40 not in str(caught.value)


def test_an_https_endpoint_on_a_plain_http_server_says_so_not_a_network_problem(
    iam_admin: servers.MotoAdmin,
) -> None:
    endpoint = iam_admin.endpoint.replace("http://", "https://")
    wrong = eim.EimIdentity(
        region=iam_admin.region,
        endpoint_url=endpoint,
        credentials=(iam_admin.access_key_id, model.Secret(iam_admin.secret_access_key)),
        max_attempts=1,
        connect_timeout=2.0,
        read_timeout=5.0,
    )

    with pytest.raises(errors.EimTransientError) as caught:
        wrong.list_keys("watcher_1")

    message = str(caught.value)
    assert f"EIM at {endpoint} does not speak TLS" in message
    assert "is eim.endpoint meant to be http://?" in message
    assert iam_admin.secret_access_key not in message


def test_results_and_errors_never_show_the_secret(identity: eim.EimIdentity, seeded: str) -> None:
    new = identity.create_key("watcher_1")
    secret = new.secret.reveal()
    result = identity.verify_key(new.key_id, new.secret)

    shown = [repr(new), str(new), repr(new.secret), str(new.secret), repr(result), repr(identity)]
    shown += [repr(k) for k in identity.list_keys("watcher_1")]
    assert len(secret) >= 20
    assert all(secret not in text for text in shown)
    assert new.key_id in repr(new)  # ids may be shown; they are not secret


# --- the wire, with a loopback recorder ------------------------------------------------------

GET_USER_OK = b"""<GetUserResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/">
  <GetUserResult><User><Path>/</Path><UserName>watcher_1</UserName>
    <UserId>AIDAEXAMPLEEXAMPLE000</UserId><Arn>arn:aws:iam::123456789012:user/watcher_1</Arn>
    <CreateDate>2017-02-08T14:11:46.463Z</CreateDate></User></GetUserResult>
  <ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ResponseMetadata>
</GetUserResponse>"""

LIST_GROUPS_OK = b"""<ListGroupsForUserResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/">
  <ListGroupsForUserResult><Groups><member><Path>/</Path><GroupName>monitoring</GroupName>
    <GroupId>AGPAEXAMPLEGROUP0001</GroupId><Arn>arn:aws:iam::123456789012:group/monitoring</Arn>
    <CreateDate>2017-02-08T14:11:46.463Z</CreateDate></member></Groups>
    <IsTruncated>false</IsTruncated></ListGroupsForUserResult>
  <ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000001</RequestId></ResponseMetadata>
</ListGroupsForUserResponse>"""
WATCHER = model.User(name="watcher_1", groups=frozenset({"monitoring"}))

THROTTLED = b"""<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>
  <Message>Rate exceeded</Message></Error><RequestId>1</RequestId></ErrorResponse>"""

# The shape OUTSCALE's gateway uses, with the status 400 it gives NoSuchEntity on some calls.
OUTSCALE_NO_SUCH_ENTITY = b"""<Response><Errors><Error><Code>NoSuchEntity</Code>
  <Message>UnknownPrincipalException</Message></Error></Errors>
  <RequestID>2</RequestID></Response>"""


@dataclass
class Recorder:
    """A loopback HTTP server answering from a script (the last answer repeats)."""

    answers: list[tuple[int, bytes]]
    requests: list[dict[str, str]] = field(default_factory=list)
    endpoint: str = ""


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder(answers=[(200, GET_USER_OK)])
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                rec.requests.append({**dict(self.headers.items()), "_body": body.decode()})
                status, answer = rec.answers.pop(0) if len(rec.answers) > 1 else rec.answers[0]
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass  # keep the test output clean

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def recorded_identity(rec: Recorder, **options: Any) -> eim.EimIdentity:
    options.setdefault("max_attempts", 1)
    return eim.EimIdentity(
        region="eu-west-2",
        endpoint_url=rec.endpoint,
        credentials=("AKIAEXAMPLEEXAMPLE00", model.Secret("r" * 40)),
        connect_timeout=2.0,
        read_timeout=5.0,
        **options,
    )


def test_default_signing_name_is_iam(recorder: Recorder) -> None:
    recorder.answers = [(200, LIST_GROUPS_OK)]

    assert recorded_identity(recorder).get_user("watcher_1") == WATCHER

    authorization = recorder.requests[0]["Authorization"]
    assert "/eu-west-2/iam/aws4_request" in authorization
    assert "Action=ListGroupsForUser" in recorder.requests[0]["_body"]


def test_signing_name_eim_puts_eim_in_the_credential_scope(recorder: Recorder) -> None:
    identity = recorded_identity(recorder, signing_name="eim")
    recorder.answers = [(200, LIST_GROUPS_OK), (200, GET_USER_OK)]

    identity.get_user("watcher_1")
    identity.verify_key("AKIANEWKEYNEWKEY0000", model.Secret("n" * 40))

    scopes = [r["Authorization"].split("Credential=")[1].split(",")[0] for r in recorder.requests]
    assert len(scopes) == 2
    assert scopes[0].startswith("AKIAEXAMPLEEXAMPLE00/")
    assert scopes[1].startswith("AKIANEWKEYNEWKEY0000/")
    assert all(s.endswith("/eu-west-2/eim/aws4_request") for s in scopes)
    assert all("rotator" in r["User-Agent"] for r in recorder.requests)


def test_throttled_call_is_retried_by_botocore_then_succeeds(recorder: Recorder) -> None:
    recorder.answers = [(400, THROTTLED), (200, LIST_GROUPS_OK)]

    user = recorded_identity(recorder, max_attempts=2).get_user("watcher_1")

    assert user == WATCHER
    assert len(recorder.requests) == 2


def test_throttling_that_persists_after_retries_is_a_transient_error(recorder: Recorder) -> None:
    recorder.answers = [(503, THROTTLED)]

    with pytest.raises(errors.EimTransientError) as caught:
        recorded_identity(recorder, max_attempts=2).get_user("watcher_1")

    assert len(recorder.requests) == 2
    assert caught.value.code == "Throttling"
    assert recorder.endpoint in str(caught.value)


def test_outscale_error_shape_with_status_400_is_understood(recorder: Recorder) -> None:
    recorder.answers = [(400, OUTSCALE_NO_SUCH_ENTITY)]

    assert recorded_identity(recorder).get_user("ghost") is None


@pytest.mark.parametrize(
    ("status", "page"),
    [
        (502, b"<html><body>Bad gateway</body></html>"),
        (500, b"<!doctype html>\n<html><title>500 Internal Server Error</title></html>"),
    ],
)
def test_an_html_answer_is_a_transient_error_naming_the_endpoint(
    recorder: Recorder, status: int, page: bytes
) -> None:
    recorder.answers = [(status, page)]

    with pytest.raises(errors.EimTransientError) as caught:
        recorded_identity(recorder).get_user("watcher_1")
    assert recorder.endpoint in str(caught.value)


# --- one verification client per service, signing with each thread's key under test ------------


def _signed_key_id(request: dict[str, str]) -> str:
    return request["Authorization"].split("Credential=")[1].split("/")[0]


def test_concurrent_verifications_each_sign_with_their_own_key(recorder: Recorder) -> None:
    identity = recorded_identity(recorder)
    identity.verify_key("AKIAWARMWARMWARM0000", model.Secret("w" * 40))  # builds the client
    both_set = threading.Barrier(2, timeout=10)
    # Both threads hold their key before either signs: a key shared between threads (the last
    # one set) would sign both requests with the same id.
    identity._probe("iam").meta.events.register("before-sign.iam", lambda **_: both_set.wait())
    keys = {"AKIAFIRSTFIRSTFIRST0": "a" * 40, "AKIASECONDSECONDSEC0": "b" * 40}
    results: dict[str, model.VerifyResult] = {}

    def verify(key_id: str) -> None:
        results[key_id] = identity.verify_key(key_id, model.Secret(keys[key_id]))

    threads = [threading.Thread(target=verify, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)

    assert all(r.outcome is model.VerifyOutcome.VALID for r in results.values())
    assert sorted(_signed_key_id(r) for r in recorder.requests[1:]) == sorted(keys)


def test_verification_signs_with_the_key_under_test_never_the_environment(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTENV00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "e" * 40)
    identity = recorded_identity(recorder)

    first = identity.verify_key("AKIANEWKEYNEWKEY0000", model.Secret("n" * 40))
    second = identity.verify_key("AKIANEXTKEYNEXTKEY00", model.Secret("m" * 40))

    assert first.outcome is second.outcome is model.VerifyOutcome.VALID
    assert [_signed_key_id(r) for r in recorder.requests] == [
        "AKIANEWKEYNEWKEY0000",
        "AKIANEXTKEYNEXTKEY00",
    ]
    assert not identity._key_under_test.held()  # the secret is not kept once the call is over


def test_the_verification_client_cannot_sign_outside_a_verification(recorder: Recorder) -> None:
    identity = recorded_identity(recorder)
    identity.verify_key("AKIANEWKEYNEWKEY0000", model.Secret("n" * 40))

    with pytest.raises(RuntimeError, match="signs only inside"):
        identity._probe("iam").get_user()
    assert len(recorder.requests) == 1  # nothing was sent unsigned or with another key


def test_the_verification_client_shares_the_service_model_already_loaded(
    recorder: Recorder,
) -> None:
    identity = recorded_identity(recorder)

    probe = identity._probe("iam")

    # one loader, so the IAM model (about 12 MB) is not loaded a second time for verification
    assert probe._loader is identity._client._loader  # type: ignore[attr-defined]


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """rotator's logging at debug level into a buffer, so botocore's own debug lines are in it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    library_levels = {name: logging.getLogger(name).level for name in log.LIBRARY_LOGGERS}
    stream = io.StringIO()
    log.configure(format="json", level="debug", stream=stream)
    try:
        yield stream
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
        for name, library_level in library_levels.items():
            logging.getLogger(name).setLevel(library_level)


def test_no_request_signature_reaches_the_debug_log(
    recorder: Recorder, debug_log: io.StringIO
) -> None:
    # The signatures are taken from the requests as the server got them: whatever form the
    # libraries log them in (botocore.auth writes "Signature:\n<hex>"), none may show.
    recorder.answers = [(200, LIST_GROUPS_OK), (200, GET_USER_OK)]
    identity = recorded_identity(recorder)

    identity.get_user("watcher_1")
    identity.verify_key("AKIANEWKEYNEWKEY0000", model.Secret("n" * 40))

    signatures = [r["Authorization"].rsplit("Signature=", 1)[1] for r in recorder.requests]
    text = debug_log.getvalue()
    assert len(signatures) == 2 and all(len(s) == 64 for s in signatures)
    assert '"logger": "botocore.auth"' in text  # botocore's signing debug lines were logged
    for signature in signatures:
        assert signature not in text
