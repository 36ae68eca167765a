"""OUTSCALE EIM quirks (OUTSCALE.md section 4), replayed through botocore's Stubber.

The responses have the shapes EIM answers with; nothing here touches the network. Error
translation is also checked directly on the botocore exceptions it has to handle.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import botocore.exceptions
import pytest
from botocore.stub import Stubber

from rotator import errors, model
from rotator.adapters import eim

ENDPOINT = "https://eim.eu-west-2.outscale.com"
ACCOUNT = "123456789012"
CREATED = datetime(2017, 2, 8, 14, 11, 46, 463000, tzinfo=UTC)
DOCUMENT = {
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["ec2:Describe*", "elasticloadbalancing:Describe*"],
            "Resource": ["*"],
        }
    ]
}
POLICY_ARN = f"arn:aws:iam::{ACCOUNT}:policy/monitoring"


@pytest.fixture
def identity() -> eim.EimIdentity:
    return eim.EimIdentity(
        region="eu-west-2",
        endpoint_url=ENDPOINT,
        credentials=("AKIAEXAMPLEEXAMPLE00", model.Secret("rotator-own-secret-value")),
        max_attempts=1,
    )


@pytest.fixture
def stub(identity: eim.EimIdentity) -> Iterator[Stubber]:
    identity._once_client = identity._client  # one stub for the no-retry client too
    with Stubber(identity._client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def key_meta(key_id: str, status: str) -> dict[str, Any]:
    return {"UserName": "watcher_1", "AccessKeyId": key_id, "Status": status, "CreateDate": CREATED}


# --- user names and statuses ---------------------------------------------------------------


def test_create_key_accepts_a_user_name_answered_as_an_orn(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stub.add_response(
        "create_access_key",
        {
            "AccessKey": {
                "UserName": f"orn:ows:idauth::{ACCOUNT}:user/watcher_1",
                "AccessKeyId": "AKIANEWKEYNEWKEY0000",
                "Status": "Active",
                "SecretAccessKey": "the-new-secret-the-new-secret-0000",
                "CreateDate": CREATED,
            }
        },
        {"UserName": "watcher_1"},
    )

    new = identity.create_key("watcher_1")

    assert new.key_id == "AKIANEWKEYNEWKEY0000"
    assert new.secret.reveal() == "the-new-secret-the-new-secret-0000"
    assert new.created == CREATED
    assert "the-new-secret" not in repr(new)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("Active", model.KeyStatus.ACTIVE),
        ("ACTIVE", model.KeyStatus.ACTIVE),
        ("active", model.KeyStatus.ACTIVE),
        ("Inactive", model.KeyStatus.INACTIVE),
        ("INACTIVE", model.KeyStatus.INACTIVE),
    ],
)
def test_key_status_is_normalised_whatever_its_case(
    identity: eim.EimIdentity, stub: Stubber, wire: str, expected: model.KeyStatus
) -> None:
    stub.add_response(
        "list_access_keys", {"AccessKeyMetadata": [key_meta("AKIAEXAMPLEKEY0001", wire)]}
    )

    assert [k.status for k in identity.list_keys("watcher_1")] == [expected]


def test_an_unknown_key_status_is_an_error_not_a_guess(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stub.add_response(
        "list_access_keys", {"AccessKeyMetadata": [key_meta("AKIAEXAMPLEKEY0001", "Expired")]}
    )

    with pytest.raises(errors.EimError, match="unknown key status"):
        identity.list_keys("watcher_1")


def test_key_dates_become_aware_utc(identity: eim.EimIdentity, stub: Stubber) -> None:
    paris = timezone(timedelta(hours=1))
    meta = key_meta("AKIAEXAMPLEKEY0001", "Active") | {
        "CreateDate": datetime(2017, 2, 8, 15, 11, tzinfo=paris)
    }
    stub.add_response("list_access_keys", {"AccessKeyMetadata": [meta]})

    (key,) = identity.list_keys("watcher_1")

    assert key.created == datetime(2017, 2, 8, 14, 11, tzinfo=UTC)
    assert key.created.utcoffset() == timedelta(0)


# --- pagination ------------------------------------------------------------------------------


def test_list_answers_without_is_truncated_or_marker_are_one_page(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    # One stubbed answer each: a second request would fail the test (nothing left to answer).
    stub.add_response(
        "list_access_keys",
        {
            "AccessKeyMetadata": [
                key_meta("AKIAEXAMPLEKEY0001", "Active"),
                key_meta("AKIAEXAMPLEKEY0002", "Inactive"),
            ]
        },
    )
    stub.add_response(
        "list_groups_for_user",
        {
            "Groups": [
                {
                    "Path": "/",
                    "GroupName": "monitoring",
                    "GroupId": "AGPAEXAMPLEGROUP001",
                    "Arn": f"orn:ows:idauth::{ACCOUNT}:group/monitoring",
                    "CreateDate": CREATED,
                }
            ]
        },
    )
    stub.add_response(
        "list_attached_group_policies",
        {"AttachedPolicies": [{"PolicyName": "monitoring", "PolicyArn": POLICY_ARN}]},
    )

    keys = identity.list_keys("watcher_1")
    user = identity.get_user("watcher_1")
    group = identity.get_group("monitoring")

    assert [k.key_id for k in keys] == ["AKIAEXAMPLEKEY0001", "AKIAEXAMPLEKEY0002"]
    assert user == model.User(name="watcher_1", groups=frozenset({"monitoring"}))
    assert group == model.Group(name="monitoring", attached_policies=frozenset({"monitoring"}))


def test_list_answers_with_a_marker_are_followed_to_the_last_page(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stub.add_response(
        "list_access_keys",
        {
            "AccessKeyMetadata": [key_meta("AKIAEXAMPLEKEY0001", "Active")],
            "IsTruncated": True,
            "Marker": "m1",
        },
        {"UserName": "watcher_1"},
    )
    stub.add_response(
        "list_access_keys",
        {"AccessKeyMetadata": [key_meta("AKIAEXAMPLEKEY0002", "Active")], "IsTruncated": False},
        {"UserName": "watcher_1", "Marker": "m1"},
    )

    assert [k.key_id for k in identity.list_keys("watcher_1")] == [
        "AKIAEXAMPLEKEY0001",
        "AKIAEXAMPLEKEY0002",
    ]


def test_a_list_whose_marker_repeats_is_an_error_not_an_endless_loop(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stuck = {
        "AccessKeyMetadata": [key_meta("AKIAEXAMPLEKEY0001", "Active")],
        "IsTruncated": True,
        "Marker": "m1",
    }
    stub.add_response("list_access_keys", stuck, {"UserName": "watcher_1"})
    stub.add_response("list_access_keys", stuck, {"UserName": "watcher_1", "Marker": "m1"})

    with pytest.raises(errors.EimError, match="same page marker twice"):
        identity.list_keys("watcher_1")


# --- policies ----------------------------------------------------------------------------------


def stub_policy_reads(stub: Stubber, document: object) -> None:
    stub.add_response(
        "list_policies",
        {
            "Policies": [
                {"PolicyName": "other", "Arn": f"arn:aws:iam::{ACCOUNT}:policy/other"},
                {
                    "PolicyName": "monitoring",
                    "Arn": POLICY_ARN,
                    "DefaultVersionId": "v2",
                    "CreateDate": CREATED,
                },
            ]
        },
        {"Scope": "Local"},
    )
    stub.add_response(
        "list_policy_versions",
        {
            "Versions": [
                {"VersionId": "v2", "IsDefaultVersion": True, "CreateDate": CREATED},
                {
                    "VersionId": "v1",
                    "IsDefaultVersion": False,
                    "CreateDate": CREATED - timedelta(days=1),
                },
            ]
        },
        {"PolicyArn": POLICY_ARN},
    )
    stub.add_response(
        "get_policy_version",
        {
            "PolicyVersion": {
                "Document": document,
                "VersionId": "v2",
                "IsDefaultVersion": True,
                "CreateDate": CREATED,
            }
        },
        {"PolicyArn": POLICY_ARN, "VersionId": "v2"},
    )


def test_policy_document_answered_url_encoded_is_parsed_to_a_dict(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stub_policy_reads(stub, urllib.parse.quote(json.dumps(DOCUMENT)))

    policy = identity.get_policy("monitoring")

    assert policy is not None
    assert policy.document == DOCUMENT
    assert policy.arn == POLICY_ARN
    assert policy.default_version_id == "v2"
    assert [v.version_id for v in policy.versions] == ["v1", "v2"]  # oldest first


@pytest.mark.parametrize(
    "raw",
    [
        DOCUMENT,
        json.dumps(DOCUMENT),
        urllib.parse.quote(json.dumps(DOCUMENT)),
        urllib.parse.quote(urllib.parse.quote(json.dumps(DOCUMENT))),
        json.dumps(json.dumps(DOCUMENT)),
    ],
    ids=["dict", "json", "url-encoded", "url-encoded-twice", "json-in-a-json-string"],
)
def test_policy_document_parses_from_every_encoding_seen(raw: object) -> None:
    assert eim.parse_policy_document(raw) == DOCUMENT


@pytest.mark.parametrize("raw", [None, 42, "not json", "%7Bbroken", "[1, 2]"])
def test_unparsable_policy_document_is_an_error(raw: object) -> None:
    with pytest.raises(errors.EimError, match="cannot parse"):
        eim.parse_policy_document(raw)


def test_absent_policy_is_none_after_listing_local_policies(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stub.add_response(
        "list_policies",
        {"Policies": [{"PolicyName": "other", "Arn": f"arn:aws:iam::{ACCOUNT}:policy/other"}]},
        {"Scope": "Local"},
    )

    assert identity.get_policy("monitoring") is None


def test_policy_documents_are_sent_as_compact_json(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    compact = (
        '{"Statement":[{"Effect":"Allow","Action":["ec2:Describe*",'
        '"elasticloadbalancing:Describe*"],"Resource":["*"]}]}'
    )
    stub.add_response(
        "create_policy",
        {"Policy": {"PolicyName": "monitoring", "Arn": POLICY_ARN}},
        {
            "PolicyName": "monitoring",
            "PolicyDocument": compact,
            "Description": "Allow describe for every item",
        },
    )
    stub.add_response(
        "create_policy_version",
        {"PolicyVersion": {"VersionId": "v2", "IsDefaultVersion": True}},
        {"PolicyArn": POLICY_ARN, "PolicyDocument": compact, "SetAsDefault": True},
    )

    arn = identity.create_policy("monitoring", "Allow describe for every item", DOCUMENT)
    identity.create_policy_version(arn, DOCUMENT)

    assert arn == POLICY_ARN


def test_key_status_is_sent_in_iam_spelling(identity: eim.EimIdentity, stub: Stubber) -> None:
    stub.add_response(
        "update_access_key",
        {},
        {"UserName": "watcher_1", "AccessKeyId": "AKIAEXAMPLEKEY0001", "Status": "Inactive"},
    )

    identity.set_key_status("watcher_1", "AKIAEXAMPLEKEY0001", model.KeyStatus.INACTIVE)

    stub.assert_no_pending_responses()  # the call was made, with exactly those parameters


# --- errors as EIM sends them --------------------------------------------------------------------


def test_no_such_entity_with_status_400_means_the_user_is_absent(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stub.add_client_error(
        "list_groups_for_user", "NoSuchEntity", "UnknownPrincipalException", http_status_code=400
    )
    stub.add_client_error(
        "list_attached_group_policies", "NoSuchEntity", "no such group", http_status_code=400
    )

    assert identity.get_user("watcher_1") is None
    assert identity.get_group("monitoring") is None


def test_no_such_entity_on_a_change_is_raised(identity: eim.EimIdentity, stub: Stubber) -> None:
    stub.add_client_error(
        "delete_access_key", "NoSuchEntity", "UnknownPrincipalException", http_status_code=400
    )

    with pytest.raises(errors.EimNoSuchEntity) as caught:
        identity.delete_key("ghost", "AKIAEXAMPLEKEY0001")
    assert caught.value.action == "iam:DeleteAccessKey"


def test_invalid_action_is_unsupported(identity: eim.EimIdentity, stub: Stubber) -> None:
    stub.add_client_error(
        "delete_policy_version",
        "InvalidAction",
        "Action is not valid for this web service",
        http_status_code=400,
    )

    with pytest.raises(errors.EimUnsupported) as caught:
        identity.delete_policy_version(POLICY_ARN, "v1")
    assert caught.value.code == "InvalidAction"
    assert ENDPOINT in str(caught.value)
    assert not caught.value.transient


def test_limit_exceeded_on_create_key_is_quota_exceeded(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stub.add_client_error(
        "create_access_key",
        "LimitExceeded",
        "Cannot exceed quota for AccessKeysPerUser: 2",
        http_status_code=409,
    )

    with pytest.raises(errors.EimQuotaExceeded) as caught:
        identity.create_key("watcher_1")
    assert "iam:CreateAccessKey" in str(caught.value)
    assert not caught.value.transient


def test_access_denied_with_status_400_names_the_permission_to_grant(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    stub.add_client_error(
        "create_access_key", "AccessDenied", "Access denied", http_status_code=400
    )

    with pytest.raises(errors.EimAccessDenied) as caught:
        identity.create_key("watcher_1")
    message = str(caught.value)
    assert "iam:CreateAccessKey" in message
    assert "rotator's own policy" in message


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ServiceUnavailable", 503),
        ("Throttling", 429),
        ("RequestLimitExceeded", 400),
        ("ErrorOperationThrottledWholePlatform", 503),  # unknown code: the 5xx status decides
        ("ErrorOperationThrottledPerAccount", 429),  # unknown code: 429 decides
    ],
)
def test_throttling_and_unavailability_are_transient_naming_the_endpoint(
    identity: eim.EimIdentity, stub: Stubber, code: str, status: int
) -> None:
    stub.add_client_error("list_access_keys", code, "slow down", http_status_code=status)

    with pytest.raises(errors.EimTransientError) as caught:
        identity.list_keys("watcher_1")
    assert caught.value.transient
    assert ENDPOINT in str(caught.value)
    assert "iam:ListAccessKeys" in str(caught.value)


@pytest.mark.parametrize("code", ["MalformedPolicyDocument", "ValidationError", "InvalidInput"])
def test_refused_documents_are_invalid_requests(
    identity: eim.EimIdentity, stub: Stubber, code: str
) -> None:
    stub.add_client_error("create_policy", code, "bad document", http_status_code=400)

    with pytest.raises(errors.EimInvalidRequest) as caught:
        identity.create_policy("monitoring", "", DOCUMENT)
    assert "bad document" in str(caught.value)


def test_already_exists_is_its_own_error(identity: eim.EimIdentity, stub: Stubber) -> None:
    stub.add_client_error("create_group", "EntityAlreadyExists", "exists", http_status_code=409)

    with pytest.raises(errors.EimAlreadyExists):
        identity.create_group("monitoring")


def test_a_server_message_echoing_a_secret_is_redacted(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    leaked = model.Secret("a-secret-that-must-never-show-0001")
    stub.add_client_error(
        "create_user",
        "ValidationError",
        f"value {leaked.reveal()} is invalid",
        http_status_code=400,
    )

    with pytest.raises(errors.EimInvalidRequest) as caught:
        identity.create_user("watcher_1")
    assert leaked.reveal() not in str(caught.value)
    assert "**********" in str(caught.value)


# --- verification with the new key -----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        ("AccessDenied", model.VerifyOutcome.VALID),
        ("UnauthorizedOperation", model.VerifyOutcome.VALID),
        ("InvalidClientTokenId", model.VerifyOutcome.NOT_YET),
        ("SignatureDoesNotMatch", model.VerifyOutcome.NOT_YET),
        ("AuthFailure", model.VerifyOutcome.NOT_YET),
    ],
)
def test_verify_classifies_what_the_new_key_got(
    identity: eim.EimIdentity,
    monkeypatch: pytest.MonkeyPatch,
    code: str,
    outcome: model.VerifyOutcome,
) -> None:
    status = 401 if code == "AuthFailure" else 400
    _stub_verification(
        identity,
        monkeypatch,
        lambda s: s.add_client_error("get_user", code, "x", http_status_code=status),
    )

    assert identity.verify_key("AKIAEXAMPLENEWKEY1", model.Secret("new-secret-new-secret")) == (
        model.VerifyResult(outcome, detail=code)
    )


def test_verify_raises_on_anything_else(
    identity: eim.EimIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stub_verification(
        identity,
        monkeypatch,
        lambda s: s.add_client_error("get_user", "ServiceUnavailable", "x", http_status_code=503),
    )

    with pytest.raises(errors.EimTransientError) as caught:
        identity.verify_key("AKIAEXAMPLENEWKEY1", model.Secret("new-secret-new-secret"))
    assert caught.value.action == "iam:GetUser"


def _stub_verification(
    identity: eim.EimIdentity, monkeypatch: pytest.MonkeyPatch, script: Any
) -> None:
    real_make_probe = identity._make_probe

    def make_probe(service: str) -> Any:
        made = real_make_probe(service)
        stubber = Stubber(made)
        script(stubber)
        stubber.activate()
        return made

    monkeypatch.setattr(identity, "_make_probe", make_probe)


# --- translation of botocore's own exceptions ----------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (
            botocore.exceptions.EndpointConnectionError(endpoint_url=ENDPOINT),
            errors.EimTransientError,
        ),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url=ENDPOINT), errors.EimTransientError),
        (botocore.exceptions.ReadTimeoutError(endpoint_url=ENDPOINT), errors.EimTransientError),
        (
            botocore.exceptions.ConnectionClosedError(endpoint_url=ENDPOINT),
            errors.EimTransientError,
        ),
        (botocore.exceptions.NoCredentialsError(), errors.EimAuthenticationError),
    ],
)
def test_connection_failures_and_missing_credentials_are_translated(
    exc: Exception, kind: type[errors.EimError]
) -> None:
    translated = eim.translate_error(exc, action="iam:ListAccessKeys", endpoint=ENDPOINT)

    assert type(translated) is kind
    assert "iam:ListAccessKeys" in str(translated)


def test_missing_credentials_message_says_where_to_put_them() -> None:
    translated = eim.translate_error(
        botocore.exceptions.NoCredentialsError(), action="iam:GetUser", endpoint=ENDPOINT
    )

    assert "eim.credentials_file" in str(translated)
    assert "AWS_ACCESS_KEY_ID" in str(translated)


def test_an_unknown_verify_action_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError) as caught:
        eim.EimIdentity(
            region="eu-west-2",
            endpoint_url=ENDPOINT,
            credentials=None,
            verify_action="iam:ListUsers",
        )
    assert caught.value.path == "eim.verify_action"


@pytest.mark.parametrize(
    "answered",
    [
        "watcher_1",
        f"orn:ows:idauth::{ACCOUNT}:user/watcher_1",
        f"orn:ows:idauth::{ACCOUNT}:user/team/monitoring/watcher_1",
        f"arn:aws:iam::{ACCOUNT}:user/watcher_1",
    ],
)
def test_user_names_answered_as_orn_or_arn_normalise_to_the_name(answered: str) -> None:
    assert eim.plain_name(answered) == "watcher_1"


def test_an_invalid_endpoint_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(errors.ConfigError) as caught:
        eim.EimIdentity(region="eu-west-2", endpoint_url="not a url", credentials=None)
    assert caught.value.path == "eim.endpoint"


def test_groups_of_a_user_answered_as_orns_are_plain_names(
    identity: eim.EimIdentity, stub: Stubber
) -> None:
    group = {
        "Path": "/team/",
        "GroupName": f"orn:ows:idauth::{ACCOUNT}:group/team/monitoring",
        "GroupId": "AGPAEXAMPLEGROUP001",
        "Arn": f"orn:ows:idauth::{ACCOUNT}:group/team/monitoring",
        "CreateDate": CREATED,
    }
    stub.add_response("list_groups_for_user", {"Groups": [group]})

    observed = identity.get_user("watcher_1")

    assert observed == model.User(name="watcher_1", groups=frozenset({"monitoring"}))
