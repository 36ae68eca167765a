"""The boto3 implementation of :class:`rotator.ports.Identity` for OUTSCALE EIM and AWS IAM.

This is the only module of rotator that imports boto3 or botocore. Every botocore exception is
translated here, in :func:`translate_error`, into :mod:`rotator.errors`; no boto response or
exception leaves this module. It tolerates the OUTSCALE quirks of DESIGN.md section 5: an ORN in
CreateAccessKey's UserName (never compared on), ``NoSuchEntity`` and ``AccessDenied`` with status
400 (the translation branches on the error code, not the status), list answers without
``IsTruncated``/``Marker`` (botocore's paginators read that as one page), ``InvalidAction`` for
calls EIM lacks, and upper-case key states.

It must never put a secret, token or signature into an exception message or a log line.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import boto3
import botocore.credentials
import botocore.exceptions
import botocore.parsers
import botocore.session
import structlog
from botocore.config import Config

from rotator import errors, model

_log = structlog.get_logger("rotator.eim")

if TYPE_CHECKING:
    from mypy_boto3_iam import IAMClient
    from mypy_boto3_iam.literals import StatusTypeType

_VERIFY_ACTIONS = ("iam:GetUser", "sts:GetCallerIdentity")
# arn:aws:iam::123456789012:user/name, orn:ows:idauth::123456789012:user/name, ...:account
_ACCOUNT_IN_ARN = re.compile(r"^[a-z]+:[a-z-]+:[a-z-]+::(\d{12}):")
# The verification client must fail fast: a slow answer is retried on a later pass, and every
# failed signature counts toward OUTSCALE's lockout (four in a row), so it never retries itself.
_VERIFY_CONNECT_TIMEOUT = 3.0
_VERIFY_READ_TIMEOUT = 5.0

# Error codes, by what they mean for the rotator (DESIGN.md section 5). Branch on these only.
_NO_SUCH_ENTITY = frozenset({"NoSuchEntity"})
_ALREADY_EXISTS = frozenset({"EntityAlreadyExists"})
_DENIED = frozenset({"AccessDenied", "UnauthorizedOperation"})
_NOT_AUTHENTICATED = frozenset({"InvalidClientTokenId", "SignatureDoesNotMatch", "AuthFailure"})
_QUOTA = frozenset({"LimitExceeded"})
_UNSUPPORTED = frozenset({"InvalidAction"})
_INVALID = frozenset({"MalformedPolicyDocument", "ValidationError", "InvalidInput"})
_TRANSIENT = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "ServiceFailure",
        "InternalFailure",
        "InternalError",
        "ConcurrentModification",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_BOTO_ERRORS = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    botocore.parsers.ResponseParserError,
)
_MESSAGE_MAX = 300  # of the server's own message, quoted in ours


def translate_error(exc: Exception, *, action: str, endpoint: str) -> errors.EimError:
    """The rotator error for a botocore exception raised by ``action`` (``iam:CreateAccessKey``).

    The one place where EIM/IAM failures are classified. Client errors are classified by their
    ``Error.Code`` only, since OUTSCALE answers ``NoSuchEntity`` and ``AccessDenied`` with status
    400; the HTTP status is consulted only for codes not known here (any 5xx or 429 is transient).
    """
    if isinstance(exc, botocore.exceptions.ClientError):
        return _translate_client_error(exc, action=action, endpoint=endpoint)
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return errors.EimAuthenticationError(
            f"{action}: the rotator has no usable credentials of its own "
            f"({type(exc).__name__}): set eim.credentials_file, or the AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY environment variables (or another source of the boto3 chain)",
            code=type(exc).__name__,
            action=action,
        )
    if isinstance(exc, botocore.exceptions.SSLError) and errors.speaks_no_tls(exc):
        return errors.EimTransientError(
            f"{action}: EIM at {endpoint} does not speak TLS (it answered the TLS handshake in "
            "plain HTTP): is eim.endpoint meant to be http://?",
            code="SSLError",
            action=action,
        )
    if isinstance(exc, botocore.exceptions.HTTPClientError | botocore.exceptions.ConnectionError):
        # Connection refused or reset, DNS, TLS, proxy, connect and read timeouts.
        return errors.EimTransientError(
            f"{action}: could not reach EIM at {endpoint} ({type(exc).__name__}): check "
            "eim.endpoint / eim.region, the network path and the timeouts",
            code=type(exc).__name__,
            action=action,
        )
    if isinstance(exc, botocore.parsers.ResponseParserError):
        # An HTML error page from a proxy or a server that is not EIM: usually passing.
        return errors.EimTransientError(
            f"{action}: {endpoint} answered something that is not an EIM/IAM response: check "
            "eim.endpoint if it persists",
            code="ResponseParserError",
            action=action,
        )
    return errors.EimError(
        f"{action}: unexpected client failure ({type(exc).__name__}): {_safe(str(exc))}",
        code=type(exc).__name__,
        action=action,
    )


def _translate_client_error(
    exc: botocore.exceptions.ClientError, *, action: str, endpoint: str
) -> errors.EimError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    said = _safe(str(error.get("Message") or ""))
    server = f" (EIM said: {said})" if said else ""
    if code in _NO_SUCH_ENTITY:
        return errors.EimNoSuchEntity(f"{action}: no such entity{server}", code=code, action=action)
    if code in _ALREADY_EXISTS:
        return errors.EimAlreadyExists(
            f"{action}: already exists{server}", code=code, action=action
        )
    if code in _DENIED:
        return errors.EimAccessDenied(
            f"{action} was denied ({code}) to the rotator's own credentials: add the permission "
            f"{action} to the rotator's own policy{server}",
            code=code,
            action=action,
        )
    if code in _NOT_AUTHENTICATED:
        # The server's message is left out on purpose: it is about the signature.
        hint = (
            "; if the key and secret are right, the endpoint may expect another signing name: "
            "set eim.signing_name (OUTSCALE's own tools sign as eim)"
            if code == "SignatureDoesNotMatch"
            else ""
        )
        return errors.EimAuthenticationError(
            f"{action}: the rotator's own credentials are rejected by {endpoint} ({code}): "
            "check eim.credentials_file or the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            f"environment{hint}",
            code=code,
            action=action,
        )
    if code in _QUOTA:
        return errors.EimQuotaExceeded(
            f"{action}: a quota is reached ({code}): for access keys, delete an Inactive key of "
            f"the user or lower max_keys; for policy versions, delete a non-default one{server}",
            code=code,
            action=action,
        )
    if code in _UNSUPPORTED:
        return errors.EimUnsupported(
            f"{action} is not implemented by {endpoint} ({code}){server}", code=code, action=action
        )
    if code in _INVALID:
        return errors.EimInvalidRequest(
            f"{action}: the request was refused as invalid ({code}): check the names and the "
            f"policy document in the config{server}",
            code=code,
            action=action,
        )
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _TRANSIENT or status >= 500 or status == 429:
        return errors.EimTransientError(
            f"{action}: EIM at {endpoint} is throttling or failing ({code or status}){server}",
            code=code,
            action=action,
        )
    return errors.EimError(f"{action} failed ({code or status}){server}", code=code, action=action)


def _safe(text: str) -> str:
    """A server or library message fit to quote: no known secret in it, and short."""
    for value in model.Secret.find_in(text):  # longest first
        text = text.replace(value, "**********")
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_MAX else text[: _MESSAGE_MAX - 3] + "..."


def parse_policy_document(raw: object) -> dict[str, Any]:
    """A policy document as IAM returns it, as a dict.

    botocore usually hands over a dict (it URL-decodes and parses IAM documents itself); it
    leaves a string when its decoding fails, for example on a document URL-encoded twice, or
    JSON quoted as a JSON string. Each layer is peeled off, a few at most.
    """
    value: object = raw
    for _ in range(4):
        if isinstance(value, Mapping):
            return dict(value)
        if not isinstance(value, str):
            break
        text = value.strip()
        if text.startswith(("{", '"')):
            try:
                value = json.loads(text)
            except ValueError:
                break
        else:
            decoded = urllib.parse.unquote(text)
            if decoded == text:
                break
            value = decoded
    raise errors.EimError(
        "iam:GetPolicyVersion returned a policy document rotator cannot parse "
        f"({type(raw).__name__}): inspect the policy's default version",
        code="UnparsableDocument",
        action="iam:GetPolicyVersion",
    )


def compact_json(document: Mapping[str, Any]) -> str:
    """The document as sent to EIM: compact JSON (EIM's 5120-character limit counts it)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def plain_name(name: str) -> str:
    """A user name as configured, from a name or an ORN/ARN (``orn:ows:idauth::1:user/p/name``).

    Names cannot contain ``/``, so the text after the last one is the name whatever the path.
    """
    return name.rsplit("/", 1)[-1]


def _key_status(raw: str) -> model.KeyStatus:
    text = raw.strip().lower()
    for status in model.KeyStatus:
        if status.value.lower() == text:
            return status
    raise errors.EimError(
        f"iam:ListAccessKeys returned an unknown key status {raw!r}",
        code="UnknownStatus",
        action="iam:ListAccessKeys",
    )


def _signing_name_handler(signing_name: str) -> Any:
    def set_signing_name(request: Any, **_: Any) -> None:
        # botocore's signer takes the service name of the credential scope from here.
        request.context.setdefault("signing", {})["signing_name"] = signing_name

    return set_signing_name


class _KeyUnderTest(botocore.credentials.Credentials):
    """The credentials of the verification clients: the key each thread is verifying, one call long.

    botocore's signer asks its credentials for a frozen copy on every request, in the calling
    thread, so one client per service can sign every thread's verification with that thread's
    key (botocore clients are thread-safe). Building a client per key instead costs about 15 ms
    of CPU a verification. Outside :meth:`use` there is no key: the client cannot sign at all,
    and it never falls back to the environment's credential chain.
    """

    def __init__(self) -> None:
        super().__init__("", "", method="rotator-key-under-test")
        self._local = threading.local()

    @contextlib.contextmanager
    def use(self, key_id: str, secret: model.Secret) -> Iterator[None]:
        self._local.key = (key_id, secret)
        try:
            yield
        finally:
            self._local.key = None  # the secret does not outlive the call

    def held(self) -> bool:
        """Whether this thread has a key set (tests: nothing lingers after a verification)."""
        return getattr(self._local, "key", None) is not None

    def get_frozen_credentials(self) -> botocore.credentials.ReadOnlyCredentials:
        key: tuple[str, model.Secret] | None = getattr(self._local, "key", None)
        if key is None:
            raise RuntimeError("a verification client signs only inside _KeyUnderTest.use()")
        return botocore.credentials.ReadOnlyCredentials(key[0], key[1].reveal(), None, None)


class _OnlyKeyUnderTest(botocore.credentials.CredentialProvider):
    """The whole credential chain of the verification session: the key under test, nothing else."""

    METHOD = "rotator-key-under-test"

    def __init__(self, credentials: _KeyUnderTest) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> _KeyUnderTest:
        return self._credentials


class EimIdentity:
    """``ports.Identity`` over boto3's ``iam`` client, pointed at EIM (or AWS IAM when no endpoint).

    ``credentials`` None uses the standard boto3 chain (environment, shared files, instance
    metadata); otherwise the given key id and secret only. ``signing_name`` other than ``iam``
    changes the service of the SigV4 credential scope (OUTSCALE's own tools sign as ``eim``).
    ``max_attempts`` counts every request of a call, the first included (1: no retry); botocore's
    standard retry mode retries throttling, 5xx and connection failures with backoff.
    ``verify_action`` is ``iam:GetUser`` or ``sts:GetCallerIdentity``; verification makes one
    attempt with short timeouts, since OUTSCALE locks a key out after four bad signatures.
    """

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None,
        credentials: tuple[str, model.Secret] | Callable[[], tuple[str, model.Secret]] | None,
        signing_name: str = "iam",
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        max_attempts: int = 5,
        verify_action: str = "iam:GetUser",
    ) -> None:
        if verify_action not in _VERIFY_ACTIONS:
            raise errors.ConfigError(
                "eim.verify_action",
                f"{verify_action!r} is not supported: use one of {', '.join(_VERIFY_ACTIONS)}",
            )
        self._region = region
        self._endpoint_url = endpoint_url
        self._signing_name = signing_name
        self._verify_action = verify_action
        # ``total_max_attempts`` counts the first request; botocore's ``max_attempts`` key would
        # count retries only (max_attempts=1 is two requests), which is not what callers mean.
        self._verify_config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=min(connect_timeout, _VERIFY_CONNECT_TIMEOUT),
            read_timeout=min(read_timeout, _VERIFY_READ_TIMEOUT),
            user_agent_extra="rotator",
        )
        # boto3 sessions are not thread-safe (clients are): clients are built under this lock.
        self._session_lock = threading.Lock()
        # One verification client per service, built on first use, signing with each thread's
        # key under test (see _KeyUnderTest); never with the rotator's own credentials.
        self._key_under_test = _KeyUnderTest()
        self._probes: dict[str, Any] = {}
        self._config = Config(
            retries={"mode": "standard", "total_max_attempts": max(1, max_attempts)},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            user_agent_extra="rotator",
        )
        # A callable is a file read again before calls (at most once a second), so a rotated
        # credentials file is picked up without a restart.
        self._source = credentials if callable(credentials) else None
        self._checked_at = time.monotonic()
        # CreateAccessKey is not idempotent: a retry after a lost answer would make a second key
        # and leave the first one unknown. It gets one attempt; the engine's next pass is the
        # retry and the intent marker it wrote before the call finds any key the lost answer made.
        self._once_config = self._config.merge(
            Config(retries={"mode": "standard", "total_max_attempts": 1})
        )
        self._credentials = credentials() if callable(credentials) else credentials
        self._loader: Any = None
        self._client, self._once_client = self._build(self._credentials)
        self._account: tuple[object, str | None] | None = None  # (the client asked, its answer)

    def _build(self, credentials: tuple[str, model.Secret] | None) -> tuple[IAMClient, IAMClient]:
        try:
            if credentials is None:
                session = boto3.Session(
                    region_name=self._region, botocore_session=self._core(chain=True)
                )
            else:
                key_id, secret = credentials
                session = boto3.Session(
                    aws_access_key_id=key_id,
                    aws_secret_access_key=secret.reveal(),
                    region_name=self._region,
                    botocore_session=self._core(chain=False),
                )
        except botocore.exceptions.ProfileNotFound as exc:
            raise errors.ConfigError(
                "eim",
                f"the boto3 credential chain cannot start: {_safe(str(exc))}: AWS_PROFILE names "
                "a profile missing from ~/.aws/config and ~/.aws/credentials; fix or unset "
                "AWS_PROFILE, or set eim.credentials_file",
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ConfigError(
                "eim", f"the boto3 session cannot be set up: {_safe(str(exc))}"
            ) from exc
        try:
            client: IAMClient = session.client(
                "iam", endpoint_url=self._endpoint_url, config=self._config
            )
            once: IAMClient = session.client(
                "iam", endpoint_url=self._endpoint_url, config=self._once_config
            )
        except ValueError as exc:  # botocore's "Invalid endpoint"
            raise errors.ConfigError("eim.endpoint", f"{self._endpoint_url!r}: {exc}") from exc
        self._register_signing_name(client, "iam")
        self._register_signing_name(once, "iam")
        return client, once

    def _core(self, *, chain: bool) -> botocore.session.Session:
        """A botocore session sharing this adapter's data loader: the IAM service model (about
        12 MB) is loaded once for every session, the verification clients' included.

        ``chain``: the credentials come from boto3's standard chain, so ``AWS_PROFILE`` picks
        the profile. Otherwise (a credentials file, a key under test) the environment's profile
        is not looked at: naming a profile the machine lacks must not break explicit credentials.
        """
        session = botocore.session.Session(
            session_vars=None if chain else {"profile": (None, None, None, None)}
        )
        if self._loader is None:
            self._loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", self._loader)
        return session

    def _reload_credentials(self) -> None:
        if self._source is None or time.monotonic() - self._checked_at < 1.0:
            return
        with self._session_lock:
            self._checked_at = time.monotonic()
            fresh = self._source()
            if fresh == self._credentials:
                return
            self._client, self._once_client = self._build(fresh)
            self._credentials = fresh
        _log.info("eim_credentials_reloaded", key_id=fresh[0])

    def __repr__(self) -> str:
        return f"EimIdentity(endpoint={self.endpoint!r}, region={self._region!r})"

    @property
    def endpoint(self) -> str:
        """The URL the calls go to (resolved by botocore when no endpoint was given)."""
        return str(self._client.meta.endpoint_url)

    def _register_signing_name(self, client: Any, service: str) -> None:
        if service == "iam" and self._signing_name != "iam":
            client.meta.events.register(
                "before-sign.iam", _signing_name_handler(self._signing_name)
            )

    @contextlib.contextmanager
    def _calling(self, operation: str) -> Iterator[None]:
        """Translate whatever botocore raises while ``operation`` (``CreateUser``) runs."""
        self._reload_credentials()
        try:
            yield
        except _BOTO_ERRORS as exc:
            raise translate_error(exc, action=f"iam:{operation}", endpoint=self.endpoint) from exc

    # --- observation ---------------------------------------------------------------------

    def get_group(self, name: str) -> model.Group | None:
        # ListAttachedGroupPolicies, not GetGroup: GetGroup returns every member, a list as long
        # as the fleet when all targets share a group. NoSuchEntity says the group is missing.
        policies: set[str] = set()
        try:
            with self._calling("ListAttachedGroupPolicies"):
                pages = self._client.get_paginator("list_attached_group_policies").paginate(
                    GroupName=name
                )
                for attached in pages:
                    policies.update(
                        p["PolicyName"]
                        for p in attached.get("AttachedPolicies", [])
                        if "PolicyName" in p
                    )
        except errors.EimNoSuchEntity:
            return None
        return model.Group(name=name, attached_policies=frozenset(policies))

    def get_policy(self, name: str) -> model.Policy | None:
        found: dict[str, Any] | None = None
        with self._calling("ListPolicies"):
            for page in self._client.get_paginator("list_policies").paginate(Scope="Local"):
                for item in page.get("Policies", []):
                    if item.get("PolicyName") == name:
                        found = dict(item)
                        break
                if found is not None:
                    break
        if found is None or "Arn" not in found:
            return None
        arn = str(found["Arn"])
        try:
            default_id = found.get("DefaultVersionId")
            if not default_id:
                with self._calling("GetPolicy"):
                    default_id = self._client.get_policy(PolicyArn=arn)["Policy"].get(
                        "DefaultVersionId"
                    )
            versions: list[model.PolicyVersion] = []
            with self._calling("ListPolicyVersions"):
                pages = self._client.get_paginator("list_policy_versions").paginate(PolicyArn=arn)
                for listed in pages:
                    for version in listed.get("Versions", []):
                        versions.append(
                            model.PolicyVersion(
                                version_id=version.get("VersionId", ""),
                                is_default=bool(version.get("IsDefaultVersion")),
                                created=model.utc(
                                    version.get("CreateDate", datetime.fromtimestamp(0, UTC))
                                ),
                            )
                        )
            if not default_id:
                default_id = next((v.version_id for v in versions if v.is_default), None)
            if not default_id:
                raise errors.EimError(
                    f"iam:GetPolicy: policy {name} has no default version",
                    code="NoDefaultVersion",
                    action="iam:GetPolicy",
                )
            with self._calling("GetPolicyVersion"):
                answer = self._client.get_policy_version(PolicyArn=arn, VersionId=default_id)
        except errors.EimNoSuchEntity:
            return None  # deleted between the listing and the reads
        document = parse_policy_document(answer["PolicyVersion"].get("Document"))
        return model.Policy(
            name=name,
            arn=arn,
            default_version_id=default_id,
            document=document,
            versions=tuple(sorted(versions, key=lambda v: v.created)),
        )

    def account(self) -> str | None:
        """The account of rotator's own credentials, from GetUser without a name (its ARN, or
        EIM's ORN); asked again only when the credentials change. None when IAM will not say:
        the call denied (iam:GetUser not granted), or credentials that are not a user's (a role
        from the boto3 chain)."""
        self._reload_credentials()
        client = self._client
        known = self._account
        if known is not None and known[0] is client:
            return known[1]
        try:
            with self._calling("GetUser"):
                arn = str(self._client.get_user().get("User", {}).get("Arn", ""))
        except errors.EimError as exc:
            if exc.transient:
                raise  # not known yet: asked again next time
            arn = ""
        found = _ACCOUNT_IN_ARN.search(arn)
        self._account = (client, found.group(1) if found else None)
        return self._account[1]

    def get_user(self, name: str) -> model.User | None:
        # One call says both whether the user exists (NoSuchEntity) and which groups it is in.
        groups: set[str] = set()
        try:
            with self._calling("ListGroupsForUser"):
                pages = self._client.get_paginator("list_groups_for_user").paginate(UserName=name)
                for page in pages:
                    groups.update(
                        plain_name(g["GroupName"])
                        for g in page.get("Groups", [])
                        if "GroupName" in g
                    )
        except errors.EimNoSuchEntity:
            return None
        # The name asked for, not the answer's: EIM may spell it as an ORN.
        return model.User(name=name, groups=frozenset(groups))

    # --- changes -------------------------------------------------------------------------

    def create_group(self, name: str) -> None:
        with self._calling("CreateGroup"):
            self._client.create_group(GroupName=name)

    def create_policy(
        self, name: str, description: str, document: Mapping[str, Any], path: str = "/"
    ) -> str:
        request: dict[str, str] = {"PolicyName": name, "PolicyDocument": compact_json(document)}
        if description:  # EIM is not known to accept an empty description
            request["Description"] = description
        if path != "/":
            request["Path"] = path
        with self._calling("CreatePolicy"):
            answer = self._client.create_policy(**request)  # type: ignore[arg-type]
        return str(answer["Policy"]["Arn"])

    def create_policy_version(self, arn: str, document: Mapping[str, Any]) -> None:
        with self._calling("CreatePolicyVersion"):
            self._client.create_policy_version(
                PolicyArn=arn, PolicyDocument=compact_json(document), SetAsDefault=True
            )

    def delete_policy_version(self, arn: str, version_id: str) -> None:
        with self._calling("DeletePolicyVersion"):
            self._client.delete_policy_version(PolicyArn=arn, VersionId=version_id)

    def attach_group_policy(self, group: str, arn: str) -> None:
        with self._calling("AttachGroupPolicy"):
            self._client.attach_group_policy(GroupName=group, PolicyArn=arn)

    def create_user(self, name: str) -> None:
        with self._calling("CreateUser"):
            self._client.create_user(UserName=name)

    def add_user_to_group(self, user: str, group: str) -> None:
        with self._calling("AddUserToGroup"):
            self._client.add_user_to_group(UserName=user, GroupName=group)

    # --- access keys ---------------------------------------------------------------------

    def list_keys(self, user: str) -> list[model.AccessKey]:
        # The call every pass makes: pages followed by hand, as botocore's paginator would
        # (IsTruncated and Marker; an answer without them is the last page), without the
        # paginator's own cost (about a tenth of the call's CPU).
        keys: list[model.AccessKey] = []
        markers: set[str] = set()
        with self._calling("ListAccessKeys"):
            page = self._client.list_access_keys(UserName=user)
            while True:
                for meta in page.get("AccessKeyMetadata", []):
                    keys.append(
                        model.AccessKey(
                            key_id=meta["AccessKeyId"],
                            status=_key_status(str(meta.get("Status", ""))),
                            created=model.utc(meta["CreateDate"]),
                        )
                    )
                marker = page.get("Marker")
                if not page.get("IsTruncated") or not marker:
                    return keys
                if marker in markers:  # as botocore's paginator: never loop on a stuck server
                    raise errors.EimError(
                        f"ListAccessKeys for user {user} on {self.endpoint} returned the same "
                        "page marker twice; the answer cannot be trusted, nothing was changed",
                        action="iam:ListAccessKeys",
                    )
                markers.add(marker)
                page = self._client.list_access_keys(UserName=user, Marker=marker)

    def create_key(self, user: str) -> model.NewKey:
        with self._calling("CreateAccessKey"):
            answer = self._once_client.create_access_key(UserName=user)["AccessKey"]
        # answer["UserName"] may be an ORN on OUTSCALE: it is deliberately not looked at.
        created = answer.get("CreateDate")
        return model.NewKey(
            key_id=answer["AccessKeyId"],
            secret=model.Secret(answer["SecretAccessKey"]),
            # Without a date in the answer, now is the closest honest value (never earlier
            # than an intent marker written before the call).
            created=model.utc(created) if created is not None else datetime.now(UTC),
        )

    def set_key_status(self, user: str, key_id: str, status: model.KeyStatus) -> None:
        wire: dict[model.KeyStatus, StatusTypeType] = {
            model.KeyStatus.ACTIVE: "Active",
            model.KeyStatus.INACTIVE: "Inactive",
        }
        with self._calling("UpdateAccessKey"):
            self._client.update_access_key(UserName=user, AccessKeyId=key_id, Status=wire[status])

    def delete_key(self, user: str, key_id: str) -> None:
        with self._calling("DeleteAccessKey"):
            self._client.delete_access_key(UserName=user, AccessKeyId=key_id)

    def _probe(self, service: str) -> Any:
        with self._session_lock:
            client = self._probes.get(service)
            if client is None:
                client = self._probes[service] = self._make_probe(service)
        return client

    def _make_probe(self, service: str) -> Any:
        """The verification client of ``service`` ("iam" or "sts"): its only credentials are the
        key under test, so it can never sign with the environment's or the rotator's own."""
        session = self._core(chain=False)
        session.register_component(
            "credential_provider",
            botocore.credentials.CredentialResolver([_OnlyKeyUnderTest(self._key_under_test)]),
        )
        client: Any = boto3.Session(botocore_session=session, region_name=self._region).client(
            service,  # type: ignore[call-overload]  # "iam" or "sts", checked at init
            endpoint_url=self._endpoint_url,
            config=self._verify_config,
        )
        self._register_signing_name(client, service)
        return client

    def verify_key(self, key_id: str, secret: model.Secret) -> model.VerifyResult:
        service = self._verify_action.split(":", 1)[0]
        client = self._probe(service)
        endpoint = str(client.meta.endpoint_url)
        try:
            with self._key_under_test.use(key_id, secret):
                if service == "iam":
                    client.get_user()
                else:
                    client.get_caller_identity()
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "")
            if code in _DENIED:
                return model.VerifyResult(model.VerifyOutcome.VALID, detail=code)
            if code in _NOT_AUTHENTICATED:
                return model.VerifyResult(model.VerifyOutcome.NOT_YET, detail=code)
            raise translate_error(exc, action=self._verify_action, endpoint=endpoint) from exc
        except (botocore.exceptions.BotoCoreError, botocore.parsers.ResponseParserError) as exc:
            raise translate_error(exc, action=self._verify_action, endpoint=endpoint) from exc
        return model.VerifyResult(model.VerifyOutcome.VALID)


if TYPE_CHECKING:
    # mypy proves here that EimIdentity satisfies the port, method by method.
    from rotator import ports

    _PORT_CHECK: type[ports.Identity] = EimIdentity
