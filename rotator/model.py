"""Value types shared by every part: keys, secrets, the rotator state and what IAM holds.

Everything here is an immutable value. Times are aware datetimes in UTC. The state documents
written to Vault are produced and parsed here (``to_document`` / ``from_document``) so the
layout of DESIGN.md section 1 lives in one place. No I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

from rotator import errors

STATE_SCHEMA = 1
CREATED_IDS_KEPT = 50  # bounded history of key ids this rotator created


class Secret:
    """A secret string whose repr and str are masked, so it cannot leak through logs or tracebacks.

    Every value ever wrapped is also remembered (boundedly) so the log redaction step can remove
    it even if someone formats it by mistake. ``find_in`` says which remembered values a text
    contains in time proportional to the text's length, however many values are remembered.
    """

    __slots__ = ("_value",)
    _PREFIX: ClassVar[int] = 8  # shorter values are not remembered (too likely in plain text)
    _KNOWN_MAX: ClassVar[int] = 4096
    _known: ClassVar[dict[str, None]] = {}  # insertion-ordered set
    _known_lock: ClassVar[threading.Lock] = threading.Lock()
    # first _PREFIX characters -> the remembered values so starting. Kept up to date on every
    # insert and eviction under the lock (a few operations, whatever the registry's size);
    # readers look values up without the lock (a dict look-up is atomic in CPython).
    _by_prefix: ClassVar[dict[str, tuple[str, ...]]] = {}
    _shortest: ClassVar[int] = 0  # at most the shortest remembered length (0: none yet)

    def __init__(self, value: str) -> None:
        self._value = value
        if len(value) >= Secret._PREFIX:
            with Secret._known_lock:
                if value not in Secret._known:
                    Secret._remember(value)

    @staticmethod
    def _remember(value: str) -> None:
        known, by_prefix = Secret._known, Secret._by_prefix
        known[value] = None
        prefix = value[: Secret._PREFIX]
        by_prefix[prefix] = (*by_prefix.get(prefix, ()), value)
        if Secret._shortest == 0 or len(value) < Secret._shortest:
            Secret._shortest = len(value)
        while len(known) > Secret._KNOWN_MAX:
            oldest = next(iter(known))
            del known[oldest]
            prefix = oldest[: Secret._PREFIX]
            rest = tuple(v for v in by_prefix.get(prefix, ()) if v != oldest)
            if rest:
                by_prefix[prefix] = rest
            else:
                del by_prefix[prefix]

    def reveal(self) -> str:
        """The secret itself: call only where it is handed to a client library or Vault."""
        return self._value

    @classmethod
    def known_values(cls) -> tuple[str, ...]:
        """Every remembered value, oldest first."""
        with Secret._known_lock:
            return tuple(Secret._known)

    @classmethod
    def find_in(cls, text: str) -> tuple[str, ...]:
        """The remembered values occurring in ``text``, longest first, each once.

        Replacing them in this order masks a value that contains another whole. One dictionary
        look-up per position of ``text`` (its next ``_PREFIX`` characters), then a comparison
        with the few values sharing that prefix: the registry's size does not matter.
        """
        shortest = Secret._shortest
        if shortest == 0 or len(text) < shortest:
            return ()
        starting_with = Secret._by_prefix.get
        width = Secret._PREFIX
        found: dict[str, None] = {}
        for i in range(len(text) - shortest + 1):
            candidates = starting_with(text[i : i + width])
            if candidates is not None:
                for value in candidates:
                    if text.startswith(value, i):
                        found[value] = None
        return tuple(sorted(found, key=len, reverse=True))

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


# --- time ------------------------------------------------------------------------------------


def utc(value: datetime) -> datetime:
    """The same instant as an aware UTC datetime; a naive value is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, the form written to Vault."""
    return utc(value).isoformat().replace("+00:00", "Z")


# Times outside these years are no time rotator wrote: adding a max_age to them could overflow.
_YEARS: Final = range(1970, 9000)


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 / ISO 8601; a timestamp without a zone is UTC (never the host's zone).

    Anything else, a time before 1970 or after 8999 included, is a ValueError.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a time string")
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        parsed = utc(datetime.fromisoformat(value))
    except OverflowError:  # in UTC the time falls outside datetime's years
        raise ValueError(f"time {text!r} is out of range") from None
    if parsed.year not in _YEARS:
        raise ValueError(f"time {text!r} is out of range")
    return parsed


def _opt_time(value: Any) -> datetime | None:
    return None if value in (None, "") else parse_time(str(value))


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _fmt_opt(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def whole_seconds(value: datetime) -> datetime:
    """Drop sub-second precision: IAM may report create dates at second precision."""
    return utc(value).replace(microsecond=0)


# --- IAM side --------------------------------------------------------------------------------


class KeyStatus(enum.StrEnum):
    ACTIVE = "Active"
    INACTIVE = "Inactive"


@dataclass(frozen=True)
class AccessKey:
    """An access key as IAM lists it (never with its secret)."""

    key_id: str
    status: KeyStatus
    created: datetime


@dataclass(frozen=True)
class NewKey:
    """A key just created: the only moment IAM returns its secret."""

    key_id: str
    secret: Secret
    created: datetime


class VerifyOutcome(enum.Enum):
    VALID = "valid"  # the key authenticated (the call succeeded or was merely not authorized)
    NOT_YET = "not_yet"  # IAM does not accept the key (yet): still propagating, or bad


@dataclass(frozen=True)
class VerifyResult:
    outcome: VerifyOutcome
    detail: str = ""  # the error code seen, for logs (never the secret)


@dataclass(frozen=True)
class PolicyVersion:
    version_id: str
    is_default: bool
    created: datetime


@dataclass(frozen=True)
class Policy:
    """A managed policy as observed, with its default version's document parsed."""

    name: str
    arn: str
    default_version_id: str
    document: Mapping[str, Any]
    versions: tuple[PolicyVersion, ...]


@dataclass(frozen=True)
class Group:
    """A group and the names of the managed policies attached to it (not its members: a
    shared group's member list grows with the fleet, a user's groups do not)."""

    name: str
    attached_policies: frozenset[str]


@dataclass(frozen=True)
class User:
    name: str
    groups: frozenset[str] = frozenset()  # the names of the groups the user is a member of


# --- Vault side ------------------------------------------------------------------------------


class Grant(enum.Enum):
    """How a lease lock was taken (``ports.Lock.acquire``)."""

    TAKEN = "taken"  # read, then written: someone else may have held it since this holder did
    RESUMED = "resumed"  # nobody wrote the lock since this holder's own last write to it, so
    # no other replica acted on the target since: what the holder observed since then is current


@dataclass(frozen=True)
class Published:
    """The published secret consumers read. ``version`` is the KV v2 version read (0: absent)."""

    access_key_id: str | None
    created_at: datetime | None
    extra: Mapping[str, Any] = field(default_factory=dict)  # fields others put there; kept
    version: int = 0
    # SHA-256 of its secret_access_key (None: not known); missing: the secret holds a key id
    # and no usable secret_access_key (absent, empty, not a string): consumers cannot sign
    secret_digest: str | None = None
    secret_missing: bool = False

    PUBLISHED_FIELDS = ("access_key_id", "secret_access_key", "created_at")


def secret_digest(secret: str) -> str:
    """A fingerprint of a secret key (SHA-256, hex) to tell it from another; never the secret.
    The secret is 40 random characters: the digest cannot be turned back into it."""
    return hashlib.sha256(secret.encode()).hexdigest()


def published_secret(data: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(secret_digest, secret_missing) of a published secret's data, as Published holds them."""
    secret = data.get("secret_access_key")
    if isinstance(secret, str) and secret:
        return secret_digest(secret), False
    return None, data.get("access_key_id") not in (None, "")


@dataclass(frozen=True)
class CurrentKey:
    key_id: str
    created: datetime
    published_at: datetime
    verified_at: datetime
    secret_digest: str | None = None  # secret_digest() of its secret (None: not known)


@dataclass(frozen=True)
class RetiringKey:
    """An old key on its way out: Active until ``retire_at``, Inactive until ``delete_at``.

    ``since`` is when it began to retire (None: written before 0.1.2): a grace lengthened by a
    reload afterwards still applies to it (rotation.retire_deadline)."""

    key_id: str
    retire_at: datetime
    deactivated_at: datetime | None = None
    delete_at: datetime | None = None
    since: datetime | None = None
    # taken for the orphan of an interrupted rotation (its secret lost): held Inactive a while
    # before it is deleted, in case it is someone's key made at that moment; made Active again
    # by someone, it is theirs: released, left alone as foreign
    orphan: bool = False


@dataclass(frozen=True)
class PendingKey:
    """A key created and stored but not yet verified; its secret lives only here and in IAM."""

    key_id: str
    secret: Secret
    created: datetime
    attempts: int = 0
    last_attempt_at: datetime | None = None
    verified_at: datetime | None = None  # it authenticated; only the publish is left to do
    replaces: str | None = None  # the key published when this one was made (it gets a grace)
    # rotator's clock when CreateAccessKey returned (None: written by an older rotator);
    # ``created`` is IAM's date, whose clock may be off rotator's: verify_timeout counts from it
    made_at: datetime | None = None
    # an attempt may have been made that ``attempts`` does not count (a process that ended in
    # it): the verification waits as if either count were right (rotation.verify_delay)
    uncounted: bool = False

    @property
    def verify_from(self) -> datetime:
        """When the verification window opened, on rotator's clock when known."""
        return self.made_at or self.created


@dataclass(frozen=True)
class Intent:
    """Written just before CreateAccessKey: the one new key IAM dates near ``started_at`` is
    ours (``rotation.INTENT_WINDOW`` after it, ``rotation.MAX_CLOCK_SKEW`` before it).

    ``existing_ids`` are the keys IAM listed just before; none of them can be the orphan.
    """

    started_at: datetime
    existing_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetState:
    """The rotator's private state for one target (DESIGN.md section 1)."""

    current: CurrentKey | None = None
    retiring: tuple[RetiringKey, ...] = ()
    pending: PendingKey | None = None
    intent: Intent | None = None
    created_ids: tuple[str, ...] = ()
    identity_digest: str | None = None
    identity_checked_at: datetime | None = None
    last_success_at: datetime | None = None
    last_rotation_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    next_due_at: datetime | None = None
    failures: int = 0  # consecutive failed rotation attempts
    retry_after: datetime | None = None  # no new key before this (backoff after a failure)
    user: str | None = None  # the EIM user whose keys these are (None: written before 0.1.1)
    # where the current key is published (None: written before 0.1.2); a config that names
    # another secret_path moves the published secret there (engine._move_published)
    secret_path: str | None = None
    # set on the state of a target renamed in the config: the target that carries its keys now
    # (engine._carry_over); a pass of a target whose state says so stops with an error
    renamed_to: str | None = None
    # "<secret_path>@<version>": the published secret version a restore was tried on and could
    # not be made (kept so that no process verifies that version's secret again)
    restore_tried: str | None = None
    # the IAM account the keys were made in (None: not known, or written before 0.1.3); a pass
    # with work whose credentials act in another account stops (engine._check_account)
    account: str | None = None

    def replace(self, **changes: Any) -> TargetState:
        return dataclasses.replace(self, **changes)

    def remember_created(self, key_id: str) -> TargetState:
        ids = (*(i for i in self.created_ids if i != key_id), key_id)
        return self.replace(created_ids=ids[-CREATED_IDS_KEPT:])

    def tracked_ids(self) -> frozenset[str]:
        """Ids of keys the state gives a role: current, pending or retiring."""
        ids = {r.key_id for r in self.retiring}
        if self.current:
            ids.add(self.current.key_id)
        if self.pending:
            ids.add(self.pending.key_id)
        return frozenset(ids)

    # --- the Vault document ---------------------------------------------------------------

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema": STATE_SCHEMA}
        doc["current"] = (
            None
            if self.current is None
            else {
                "key_id": self.current.key_id,
                "created": format_time(self.current.created),
                "published_at": format_time(self.current.published_at),
                "verified_at": format_time(self.current.verified_at),
                **(
                    {}
                    if self.current.secret_digest is None
                    else {"secret_sha256": self.current.secret_digest}
                ),
            }
        )
        doc["retiring"] = [
            {
                "key_id": r.key_id,
                "retire_at": format_time(r.retire_at),
                "deactivated_at": _fmt_opt(r.deactivated_at),
                "delete_at": _fmt_opt(r.delete_at),
                "since": _fmt_opt(r.since),
                **({"orphan": True} if r.orphan else {}),
            }
            for r in self.retiring
        ]
        doc["pending"] = (
            None
            if self.pending is None
            else {
                "key_id": self.pending.key_id,
                "secret": self.pending.secret.reveal(),
                "created": format_time(self.pending.created),
                "attempts": self.pending.attempts,
                "last_attempt_at": _fmt_opt(self.pending.last_attempt_at),
                "verified_at": _fmt_opt(self.pending.verified_at),
                "replaces": self.pending.replaces,
                "made_at": _fmt_opt(self.pending.made_at),
                "uncounted": self.pending.uncounted,
            }
        )
        doc["intent"] = (
            None
            if self.intent is None
            else {
                "started_at": format_time(self.intent.started_at),
                "existing_ids": list(self.intent.existing_ids),
            }
        )
        doc["created_ids"] = list(self.created_ids)
        doc["user"] = self.user
        doc["secret_path"] = self.secret_path
        doc["renamed_to"] = self.renamed_to
        if self.restore_tried is not None:
            doc["restore_tried"] = self.restore_tried
        doc["account"] = self.account
        doc["identity"] = {
            "digest": self.identity_digest,
            "checked_at": _fmt_opt(self.identity_checked_at),
        }
        doc["outcome"] = {
            "last_success_at": _fmt_opt(self.last_success_at),
            "last_rotation_at": _fmt_opt(self.last_rotation_at),
            "last_error": self.last_error,
            "last_error_at": _fmt_opt(self.last_error_at),
            "next_due_at": _fmt_opt(self.next_due_at),
            "failures": self.failures,
            "retry_after": _fmt_opt(self.retry_after),
        }
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> TargetState:
        """Parse a state document; an unknown or missing schema is a permanent error."""
        schema = doc.get("schema")
        if type(schema) is not int or schema != STATE_SCHEMA:  # not true, not 1.0
            raise errors.StateSchemaError(
                f"rotator state has schema {schema!r}, this rotator understands schema "
                f"{STATE_SCHEMA}: upgrade rotator, or move the state away if it is not rotator's"
            )
        try:
            cur = doc.get("current")
            pen = doc.get("pending")
            intent = doc.get("intent")
            ident = doc.get("identity") or {}
            out = doc.get("outcome") or {}
            return cls(
                current=None
                if not cur
                else CurrentKey(
                    key_id=str(cur["key_id"]),
                    created=parse_time(cur["created"]),
                    published_at=parse_time(cur["published_at"]),
                    verified_at=parse_time(cur["verified_at"]),
                    secret_digest=_opt_str(cur.get("secret_sha256")),
                ),
                retiring=tuple(
                    RetiringKey(
                        key_id=str(r["key_id"]),
                        retire_at=parse_time(r["retire_at"]),
                        deactivated_at=_opt_time(r.get("deactivated_at")),
                        delete_at=_opt_time(r.get("delete_at")),
                        since=_opt_time(r.get("since")),
                        orphan=r.get("orphan") is True,
                    )
                    for r in doc.get("retiring") or ()
                ),
                pending=None
                if not pen
                else PendingKey(
                    key_id=str(pen["key_id"]),
                    secret=Secret(str(pen["secret"])),
                    created=parse_time(pen["created"]),
                    attempts=int(pen.get("attempts") or 0),
                    last_attempt_at=_opt_time(pen.get("last_attempt_at")),
                    verified_at=_opt_time(pen.get("verified_at")),
                    replaces=str(pen["replaces"]) if pen.get("replaces") else None,
                    made_at=_opt_time(pen.get("made_at")),
                    uncounted=pen.get("uncounted") is True,
                ),
                intent=None
                if not intent
                else Intent(
                    parse_time(intent["started_at"]),
                    tuple(str(i) for i in intent.get("existing_ids") or ()),
                ),
                created_ids=tuple(str(i) for i in doc.get("created_ids") or ()),
                user=str(doc["user"]) if doc.get("user") else None,
                secret_path=str(doc["secret_path"]) if doc.get("secret_path") else None,
                renamed_to=str(doc["renamed_to"]) if doc.get("renamed_to") else None,
                restore_tried=str(doc["restore_tried"]) if doc.get("restore_tried") else None,
                account=str(doc["account"]) if doc.get("account") else None,
                identity_digest=ident.get("digest"),
                identity_checked_at=_opt_time(ident.get("checked_at")),
                last_success_at=_opt_time(out.get("last_success_at")),
                last_rotation_at=_opt_time(out.get("last_rotation_at")),
                last_error=out.get("last_error"),
                last_error_at=_opt_time(out.get("last_error_at")),
                next_due_at=_opt_time(out.get("next_due_at")),
                failures=int(out.get("failures") or 0),
                retry_after=_opt_time(out.get("retry_after")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # Any shape other than the one written (a hand edit, another tool): never a crash.
            raise errors.StateSchemaError(
                f"rotator state is malformed ({type(exc).__name__} on {exc}): "
                "inspect it with `rotator status`; restore a previous KV version if needed"
            ) from None


@dataclass(frozen=True)
class StoredState:
    """A state with the KV v2 version it was read at (0: no state yet), for check-and-set."""

    state: TargetState
    version: int
    carried_from: str | None = None  # the old name of a renamed target whose state this is


@dataclass(frozen=True)
class PassReport:
    """What one pass over one target did and saw: the input of metrics, logs and `status`."""

    target: str
    ok: bool  # the pass ended without error
    duration_seconds: float = 0.0
    rotated: bool = False  # a new key was published during this pass
    rotation_failed: bool = False  # a rotation attempt failed (create refused, never verified)
    blocked: bool = False  # a due rotation cannot proceed (no free slot, ...)
    blocked_reason: str | None = None
    published_key_id: str | None = None
    key_created: datetime | None = None  # creation time of the published key
    last_rotation_at: datetime | None = None
    next_due: datetime | None = None  # by age, or by backoff after failures
    due_by_age: datetime | None = None  # when the current key reaches max_age
    keys_observed: bool = False  # IAM's key list was read (the counts below mean something)
    keys_active: int = 0
    keys_inactive: int = 0
    foreign_keys: int = 0
    pending_key_id: str | None = None
    error: str | None = None  # one-line message of the error that ended the pass
    error_components: tuple[str, ...] = ()  # one entry per error counted (eim, vault, verify...)
    actions: tuple[str, ...] = ()  # what was done, in order (or planned, in a dry run)
    dry_run: bool = False
    skipped: str | None = None  # another replica holds the target's lease: nothing observed
