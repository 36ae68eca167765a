"""An IAM fault layer for tests: a loopback HTTP proxy in front of moto's server.

:class:`FaultProxy` listens on 127.0.0.1 (a port the kernel picks), forwards every request to an
upstream moto server unchanged, and applies rules per request. Each request is identified by its
action (``Action=`` in the form body or the query string), the service of its SigV4 credential
scope (``iam``, ``sts``, ``ec2``) and the access key id that signed it (``Credential=<KEYID>/...``
of the ``Authorization`` header, or ``X-Amz-Credential`` of a presigned URL).

Rules (each limited by action(s), by signing key id(s), by count -- "the next N matching calls" --
and removable with ``rule.remove()``; they compose, and all of it is thread-safe):

- :meth:`FaultProxy.reject_young_keys`: 403 ``InvalidClientTokenId`` for a request signed by a key
  created less than T seconds ago, as IAM does while a new key propagates. Creation times are
  learnt from the CreateAccessKey answers passing through; a key never seen created is old.
- :meth:`FaultProxy.inject`: answer an IAM-style XML error without forwarding (``FAULTS`` names
  the usual ones: throttling 400, 429, 503, 500, ``LimitExceeded`` 409, ``AccessDenied`` 403).
- :meth:`FaultProxy.drop_response`: forward the call (it takes effect upstream), then close the
  connection without answering.
- :meth:`FaultProxy.hold`: block the call before it is forwarded until the test releases it.
- :meth:`FaultProxy.random_faults`: one of the faults above on about ``rate`` of the calls.

Rules act in this order: holds; authentication (OUTSCALE lockout and Inactive keys, then young
keys); injected and random faults; OUTSCALE's own refusals (``InvalidAction``, key quota); then
the call is forwarded, and a drop rule may swallow the answer.

OUTSCALE mode (``outscale=True`` or :meth:`FaultProxy.set_outscale`) makes moto answer the way
EIM differs from it (OUTSCALE.md sections 2 and 4): CreateAccessKey's ``UserName`` as
``orn:ows:idauth::<account>:user/<name>``; ``NoSuchEntity`` with status 400 instead of 404 (and
``AccessDenied`` with 400 instead of 403); no ``IsTruncated``/``Marker`` in any answer; 400
``InvalidAction`` for calls EIM lacks; a per-user key quota below moto's 2; requests signed by an
Inactive key refused with 403 ``InvalidClientTokenId``; and, after four failed authentications in
a row for one key id, every request signed by it refused for a lock period (growing by one
period for every further four failures, up to ``lock_max``), even if valid.

Limits: the key quota can only be lowered (0, 1 or 2), since moto itself refuses a third key;
the proxy counts a user's keys from the CreateAccessKey, DeleteAccessKey and ListAccessKeys calls
that pass through it, so keys made behind its back count once a listing of the user has passed.
Key states are learnt the same way (UpdateAccessKey, ListAccessKeys). A failed authentication is
a 401/403 ``InvalidClientTokenId``, ``SignatureDoesNotMatch`` or ``AuthFailure`` answered for the
key (by moto, or by the young-key and Inactive-key refusals); any other answer moto gives below
500 ends the run. Requests refused while a key is locked do not count as further failures, and
injected faults neither count nor end a run. Like moto, the proxy closes the connection after
every answer.

The call log :attr:`FaultProxy.calls` holds ``Call(action, key_id, status)`` in order; ``status``
is what the client was answered, None when it got no answer (dropped, or a hold failed).

Only the standard library: :mod:`http.server` in front, :mod:`http.client` behind.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Any, NamedTuple
from xml.sax.saxutils import escape

from tests.support.shared import CallGate, StartStop

MOTO_ACCOUNT = "123456789012"  # moto's default account id


class Fault(NamedTuple):
    """An error answer: HTTP status, error code, message, and the error Type (Sender/Receiver)."""

    status: int
    code: str
    message: str
    type: str = "Sender"


FAULTS: dict[str, Fault] = {
    "throttling": Fault(400, "Throttling", "Rate exceeded"),
    "too_many_requests": Fault(429, "RequestLimitExceeded", "Request limit exceeded."),
    "unavailable": Fault(
        503, "ServiceUnavailable", "Service unavailable, retry later.", "Receiver"
    ),
    "internal": Fault(
        500,
        "InternalFailure",
        "The request processing has failed because of an unknown error.",
        "Receiver",
    ),
    "limit_exceeded": Fault(409, "LimitExceeded", "Cannot exceed quota for AccessKeysPerUser: 2"),
    "access_denied": Fault(403, "AccessDenied", "User is not authorized to perform this action."),
    "invalid_client_token": Fault(
        403, "InvalidClientTokenId", "The security token included in the request is invalid."
    ),
}
DROP_RESPONSE = "drop_response"  # the one random fault kind that is not an error answer
TRANSIENT_KINDS = ("throttling", "too_many_requests", "unavailable", "internal", DROP_RESPONSE)

# Calls moto implements and EIM does not (OUTSCALE.md section 5): answered 400 InvalidAction.
EIM_UNSUPPORTED_ACTIONS = frozenset(
    {
        "GetAccessKeyLastUsed",
        "TagUser",
        "UntagUser",
        "ListUserTags",
        "TagPolicy",
        "UntagPolicy",
        "ListPolicyTags",
        "TagRole",
        "UntagRole",
        "ListRoleTags",
        "GetServiceLastAccessedDetails",
        "GenerateServiceLastAccessedDetails",
    }
)
AUTH_FAILURE_CODES = frozenset({"InvalidClientTokenId", "SignatureDoesNotMatch", "AuthFailure"})

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_CREDENTIAL = re.compile(r"Credential=([^/\s,]+)/([^/\s,]*)/([^/\s,]*)/([^/\s,]*)/")
_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_MEMBER = re.compile(rb"<member>(.*?)</member>", re.S)
_PAGINATION = re.compile(rb"<IsTruncated>[^<]*</IsTruncated>|<Marker>[^<]*</Marker>|<Marker/>")
_USER_NAME = re.compile(rb"<UserName>([^<]*)</UserName>")
_IAM_NS = "https://iam.amazonaws.com/doc/2010-05-08/"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _tag(xml: bytes, name: str) -> str | None:
    found = re.search(rb"<" + name.encode() + rb">([^<]*)</" + name.encode() + rb">", xml)
    return None if found is None else found.group(1).decode(errors="replace")


def _error_code(body: bytes) -> str:
    found = _CODE.search(body)
    return "" if found is None else found.group(1).decode(errors="replace")


class Call(NamedTuple):
    """One request seen by the proxy: its action, signing key id, and the status answered."""

    action: str
    key_id: str
    status: int | None


@dataclass(frozen=True)
class Request:
    """What the proxy knows of a request: its identity, and what is forwarded."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    service: str
    action: str
    key_id: str
    params: dict[str, str] = field(default_factory=dict)


def parse_request(
    method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes
) -> Request:
    """Identify a request: service, action, signing key id and its parameters."""
    header_list = tuple(headers)
    lower = {k.lower(): v for k, v in header_list}
    query = urllib.parse.urlsplit(path).query
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    if lower.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params.update(form)
    key_id, service = "", ""
    found = _CREDENTIAL.search(lower.get("authorization", ""))
    if found is None and "X-Amz-Credential" in params:
        found = _CREDENTIAL.search("Credential=" + params["X-Amz-Credential"])
    if found is not None:
        key_id, service = found.group(1), found.group(4).lower()
    return Request(
        method=method,
        path=path,
        headers=header_list,
        body=body,
        service=service or "iam",
        action=params.get("Action", ""),
        key_id=key_id,
        params=params,
    )


def error_body(fault: Fault, service: str = "iam") -> bytes:
    """The XML error document of ``fault`` as ``service`` answers it (EC2 has its own shape)."""
    request_id = str(uuid.uuid4())
    code, message = escape(fault.code), escape(fault.message)
    if service == "ec2":
        text = (
            f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            f"</Errors><RequestID>{request_id}</RequestID></Response>"
        )
    else:
        text = (
            f'<ErrorResponse xmlns="{_IAM_NS}"><Error><Type>{escape(fault.type)}</Type>'
            f"<Code>{code}</Code><Message>{message}</Message></Error>"
            f"<RequestId>{request_id}</RequestId></ErrorResponse>"
        )
    return text.encode()


def _names(value: str | Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset({value})
    return frozenset(value)


def _action_matches(wanted: frozenset[str], request: Request) -> bool:
    for name in wanted:
        service, _, action = name.rpartition(":")
        if action == request.action and (not service or service.lower() == request.service):
            return True
    return False


# --- rules -----------------------------------------------------------------------------------


class Rule:
    """What every rule has: which calls it matches, how many more it acts on, removal.

    ``action`` is a name (``CreateAccessKey``, or ``sts:GetCallerIdentity`` to pin the service)
    or several; ``key_id`` one or several signing key ids; ``count`` None for every matching call.
    """

    def __init__(
        self,
        proxy: FaultProxy,
        *,
        action: str | Iterable[str] | None,
        key_id: str | Iterable[str] | None,
        count: int | None,
    ) -> None:
        if count is not None and count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        self._proxy = proxy
        self.actions = _names(action)
        self.key_ids = _names(key_id)
        self.remaining = count
        self.hits = 0  # calls this rule acted on

    def matches(self, request: Request) -> bool:
        """Whether the rule would act on ``request`` (filters, and count not used up)."""
        if self.remaining == 0:
            return False
        if self.actions is not None and not _action_matches(self.actions, request):
            return False
        return self.key_ids is None or request.key_id in self.key_ids

    def _consume(self) -> None:
        """Count one call acted on (called under the proxy's lock)."""
        self.hits += 1
        if self.remaining is not None:
            self.remaining -= 1

    @property
    def exhausted(self) -> bool:
        return self.remaining == 0

    def remove(self) -> None:
        """Take the rule out of the proxy; calls it already holds are not released by this."""
        self._proxy.remove(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(actions={sorted(self.actions or [])}, "
            f"key_ids={sorted(self.key_ids or [])}, remaining={self.remaining}, hits={self.hits})"
        )


class YoungKeyRule(Rule):
    """Refuse requests signed by keys created less than ``seconds`` ago."""

    def __init__(self, proxy: FaultProxy, seconds: float, **filters: Any) -> None:
        super().__init__(proxy, **filters)
        self.seconds = seconds


class InjectRule(Rule):
    """Answer ``fault`` instead of forwarding."""

    def __init__(self, proxy: FaultProxy, fault: Fault, **filters: Any) -> None:
        super().__init__(proxy, **filters)
        self.fault = fault


class DropRule(Rule):
    """Forward, then close the connection without answering."""


class RandomFaults(Rule):
    """One of ``kinds`` on about ``rate`` of the matching calls; ``count`` bounds the faults.

    ``injected`` lists ``(action, kind)`` of every fault made, in order.
    """

    def __init__(
        self,
        proxy: FaultProxy,
        rate: float,
        seed: int | None,
        kinds: Iterable[str],
        **filters: Any,
    ) -> None:
        super().__init__(proxy, **filters)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], not {rate}")
        self.kinds = tuple(kinds)
        unknown = [k for k in self.kinds if k != DROP_RESPONSE and k not in FAULTS]
        if not self.kinds or unknown:
            raise ValueError(
                f"unknown fault kinds {unknown}: use {[*FAULTS, DROP_RESPONSE]}"
                if unknown
                else "kinds is empty"
            )
        self.rate = rate
        self.seen = 0  # matching calls rolled for
        self.injected: list[tuple[str, str]] = []
        self._random = random.Random(seed)

    def _roll(self, request: Request) -> str | None:
        """The fault kind for this call, or None (called under the proxy's lock)."""
        self.seen += 1
        if self._random.random() >= self.rate:
            return None
        kind = self._random.choice(self.kinds)
        self._consume()
        self.injected.append((request.action, kind))
        return kind


class Hold(Rule, CallGate):
    """Matching calls wait in the proxy, before being forwarded, until :meth:`release`.

    Once released the hold lets its remaining matching calls through without waiting.
    """

    def __init__(self, proxy: FaultProxy, **filters: Any) -> None:
        Rule.__init__(self, proxy, **filters)
        CallGate.__init__(self)


# --- OUTSCALE mode ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OutscaleOptions:
    """How the OUTSCALE mode behaves; every field can be given to ``set_outscale``."""

    account: str = MOTO_ACCOUNT
    key_quota: int | None = None  # None: moto's own 2; 0, 1 or 2 refuse earlier
    lock_threshold: int = 4  # failed authentications in a row that lock a key
    lock_period: float = 60.0  # seconds; grows by this much every further lock_threshold failures
    lock_max: float = 600.0
    unsupported_actions: frozenset[str] = EIM_UNSUPPORTED_ACTIONS
    no_such_entity_status: int = 400
    access_denied_status: int = 400  # EIM answers a permission denial with 400 (AWS: 403)

    def __post_init__(self) -> None:
        if self.key_quota is not None and not 0 <= self.key_quota <= 2:
            raise ValueError(
                f"key_quota={self.key_quota}: only 0, 1 or 2 can be emulated, since moto itself "
                "refuses a third key (LimitExceeded); the proxy can refuse earlier, not later"
            )
        if self.lock_threshold < 1 or self.lock_period < 0 or self.lock_max < 0:
            raise ValueError("lock_threshold must be >= 1 and lock periods >= 0")


@dataclass
class _AuthState:
    failures: int = 0  # failed authentications in a row
    locked_until: float = 0.0


# --- the proxy -------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close(): no thread outlives stop()
    block_on_close = True
    allow_reuse_address = False
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.proxy._record_error()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        threading.current_thread().name = f"faultproxy-{self.server.server_address[1]}-conn"
        self.server.proxy._track(self.connection)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.server.proxy._untrack(self.connection)

    def _serve(self) -> None:
        self.server.proxy._handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the call log is the record

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def answer(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        """Send one answer and close the connection (as moto does after every answer)."""
        self.close_connection = True
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def drop(self) -> None:
        """Close the connection with nothing answered."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class FaultProxy(StartStop):
    """A loopback HTTP proxy in front of ``upstream`` (a moto server's endpoint), with rules.

    ``clock`` (monotonic seconds) decides key ages and lock periods; tests may pass a fake one.
    ``outscale`` and the :class:`OutscaleOptions` fields as keywords set the OUTSCALE mode.
    """

    def __init__(
        self,
        upstream: str,
        *,
        outscale: bool = False,
        clock: Callable[[], float] = time.monotonic,
        upstream_timeout: float = 30.0,
        **outscale_options: Any,
    ) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in _LOOPBACK:
            raise ValueError(f"upstream must be an http:// URL on loopback, not {upstream!r}")
        self.upstream = upstream
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or 80
        self._upstream_timeout = upstream_timeout
        self.clock = clock
        self._lock = threading.RLock()
        self._rules: list[Rule] = []
        self._holds: list[Hold] = []
        self._calls: list[Call] = []
        self._outscale = outscale
        self._options = OutscaleOptions(**outscale_options)
        # What the proxy learnt from the calls passing through it.
        self._created: dict[str, float] = {}  # key id -> clock() when its creation passed
        self._key_status: dict[str, str] = {}  # key id -> "active" / "inactive"
        self._user_keys: dict[str, set[str]] = {}  # user -> key ids
        self._key_user: dict[str, str] = {}  # key id -> user
        self._auth: dict[str, _AuthState] = {}
        self.errors: list[BaseException] = []  # unexpected failures inside the proxy (bugs)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._connections_changed = threading.Condition(self._lock)
        self._stopping = False

    # --- life cycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (``port`` 0: one the kernel picks, so no race) and serve."""
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._stopping = False
        server = _Server(("127.0.0.1", port), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"faultproxy-{self.port}-serve",
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, fail held calls, close every connection and join every thread."""
        server, thread = self._server, self._thread
        if server is None:
            return
        with self._lock:
            self._stopping = True
            holds = list(self._holds)
            connections = list(self._connections)
        server.shutdown()
        for hold in holds:
            hold.release(forward=False)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        server.server_close()  # joins the connection threads
        if thread is not None:
            thread.join(timeout)
        self._server, self._thread = None, None

    def wait_connections(self, count: int, timeout: float = 10.0) -> bool:
        """Block until ``count`` client connections are open on the proxy (accepted, served)."""
        with self._connections_changed:
            return self._connections_changed.wait_for(
                lambda: len(self._connections) >= count, timeout
            )

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)
            self._connections_changed.notify_all()
            stopping = self._stopping
        if stopping:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._connections_changed.notify_all()

    def _record_error(self) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, OSError):
            with self._lock:
                self.errors.append(exc)

    # --- rules ---------------------------------------------------------------------------

    def _add(self, rule: Rule) -> Any:
        with self._lock:
            self._rules.append(rule)
            if isinstance(rule, Hold):
                self._holds.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._rules.remove(rule)

    def clear_rules(self) -> None:
        """Remove every rule (held calls stay held until their hold is released)."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def reject_young_keys(
        self,
        seconds: float,
        *,
        action: str | Iterable[str] | None = None,
        key_id: str | Iterable[str] | None = None,
        count: int | None = None,
    ) -> YoungKeyRule:
        """403 InvalidClientTokenId for requests signed by a key created under ``seconds`` ago."""
        rule: YoungKeyRule = self._add(
            YoungKeyRule(self, seconds, action=action, key_id=key_id, count=count)
        )
        return rule

    def inject(
        self,
        fault: str | Fault | None = None,
        *,
        action: str | Iterable[str] | None = None,
        key_id: str | Iterable[str] | None = None,
        count: int | None = None,
        status: int | None = None,
        code: str | None = None,
        message: str | None = None,
    ) -> InjectRule:
        """Answer an error instead of forwarding: a ``FAULTS`` name, or status/code/message."""
        if isinstance(fault, str):
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}: use one of {sorted(FAULTS)}")
            base: Fault | None = FAULTS[fault]
        else:
            base = fault
        if base is None:
            if status is None or code is None:
                raise ValueError("inject needs a fault name, or both status and code")
            base = Fault(status, code, message or code, "Receiver" if status >= 500 else "Sender")
        else:
            base = base._replace(
                status=base.status if status is None else status,
                code=base.code if code is None else code,
                message=base.message if message is None else message,
            )
        rule: InjectRule = self._add(
            InjectRule(self, base, action=action, key_id=key_id, count=count)
        )
        return rule

    def drop_response(
        self,
        *,
        action: str | Iterable[str] | None = None,
        key_id: str | Iterable[str] | None = None,
        count: int | None = 1,
    ) -> DropRule:
        """Forward matching calls (they take effect), then close without answering.

        botocore sees ``ConnectionClosedError``; a client that retries sends the call again,
        which then counts as another matching call.
        """
        rule: DropRule = self._add(DropRule(self, action=action, key_id=key_id, count=count))
        return rule

    def hold(
        self,
        *,
        action: str | Iterable[str] | None = None,
        key_id: str | Iterable[str] | None = None,
        count: int | None = 1,
    ) -> Hold:
        """Block matching calls before forwarding until ``release()``; see :class:`Hold`."""
        rule: Hold = self._add(Hold(self, action=action, key_id=key_id, count=count))
        return rule

    def random_faults(
        self,
        rate: float = 0.1,
        *,
        seed: int | None = None,
        kinds: Iterable[str] = TRANSIENT_KINDS,
        action: str | Iterable[str] | None = None,
        key_id: str | Iterable[str] | None = None,
        count: int | None = None,
    ) -> RandomFaults:
        """A fault of ``kinds`` (``FAULTS`` names, ``drop_response``) on about ``rate`` of calls."""
        rule: RandomFaults = self._add(
            RandomFaults(self, rate, seed, kinds, action=action, key_id=key_id, count=count)
        )
        return rule

    # --- OUTSCALE mode -------------------------------------------------------------------

    @property
    def outscale(self) -> bool:
        return self._outscale

    @property
    def outscale_options(self) -> OutscaleOptions:
        return self._options

    def set_outscale(self, enabled: bool = True, **options: Any) -> None:
        """OUTSCALE mode on or off; ``options`` change fields of :class:`OutscaleOptions`."""
        with self._lock:
            self._options = replace(self._options, **options)
            self._outscale = enabled

    def locked(self, key_id: str) -> bool:
        """Whether OUTSCALE's authentication lockout currently refuses ``key_id``."""
        with self._lock:
            state = self._auth.get(key_id)
            return state is not None and state.locked_until > self.clock()

    # --- the call log --------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def count(
        self,
        action: str | None = None,
        *,
        key_id: str | None = None,
        status: int | None = None,
        unanswered: bool = False,
    ) -> int:
        """How many logged calls match (None: any); ``unanswered``: only those given no answer."""
        with self._lock:
            return sum(
                1
                for call in self._calls
                if (action is None or call.action == action)
                and (key_id is None or call.key_id == key_id)
                and (status is None or call.status == status)
                and (not unanswered or call.status is None)
            )

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    def _log(self, request: Request, status: int | None) -> None:
        with self._lock:
            self._calls.append(Call(request.action, request.key_id, status))

    # --- one request ---------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        body = handler.read_body()
        request = parse_request(handler.command, handler.path, list(handler.headers.items()), body)
        with self._lock:
            holds = [r for r in self._rules if isinstance(r, Hold) and r.matches(request)]
            for hold in holds:
                hold._consume()
                hold._arrive()
        try:
            for hold in holds:
                if not hold._wait():
                    self._log(request, None)
                    handler.drop()
                    return
            self._process(handler, request)
        finally:
            for hold in holds:
                hold._finish()

    def _process(self, handler: _Handler, request: Request) -> None:
        with self._lock:
            refusal, origin, drop = self._decide(request)
        if refusal is not None:
            with self._lock:
                self._account(request.key_id, refusal.status, refusal.code, origin)
            self._log(request, refusal.status)
            handler.answer(
                refusal.status, self._error_headers(), error_body(refusal, request.service)
            )
            return
        try:
            status, headers, body = self._forward(request)
        except OSError as exc:
            fault = Fault(502, "BadGateway", f"upstream {self.upstream} failed: {exc}", "Receiver")
            self._log(request, fault.status)
            handler.answer(fault.status, self._error_headers(), error_body(fault, request.service))
            return
        with self._lock:
            self._learn(request, status, body)
            self._account(
                request.key_id, status, _error_code(body) if status >= 400 else "", "upstream"
            )
            if self._outscale:
                status, headers, body = self._rewrite(request, status, headers, body)
        if drop:
            self._log(request, None)
            handler.drop()
            return
        self._log(request, status)
        handler.answer(status, headers, body)

    def _decide(self, request: Request) -> tuple[Fault | None, str, bool]:
        """(error to answer or None, its origin, whether to drop the answer), under the lock."""
        now = self.clock()
        key = request.key_id
        options = self._options
        auth_failure = self._auth_fault(request.service)
        if self._outscale and key:
            state = self._auth.get(key)
            if state is not None and state.locked_until > now:
                message = "Too many failed authentication attempts: this access key is locked."
                return auth_failure._replace(message=message), "lock", False
            if self._key_status.get(key) == "inactive":
                return auth_failure, "auth", False
        for rule in self._rules:
            if isinstance(rule, YoungKeyRule) and rule.matches(request):
                created = self._created.get(key)
                if created is not None and now - created < rule.seconds:
                    rule._consume()
                    return auth_failure, "auth", False
        for rule in self._rules:
            if isinstance(rule, InjectRule) and rule.matches(request):
                rule._consume()
                return rule.fault, "inject", False
            if isinstance(rule, RandomFaults) and rule.matches(request):
                kind = rule._roll(request)
                if kind == DROP_RESPONSE:
                    return None, DROP_RESPONSE, True
                if kind is not None:
                    return FAULTS[kind], "inject", False
        if self._outscale:
            if request.action in options.unsupported_actions:
                message = f"The action {request.action} is not valid for this web service."
                return Fault(400, "InvalidAction", message), "outscale", False
            if request.action == "CreateAccessKey" and options.key_quota is not None:
                user = request.params.get("UserName") or self._key_user.get(key)
                if user is not None and len(self._user_keys.get(user, ())) >= options.key_quota:
                    message = f"Cannot exceed quota for AccessKeysPerUser: {options.key_quota}"
                    return Fault(409, "LimitExceeded", message), "outscale", False
        for rule in self._rules:
            if isinstance(rule, DropRule) and rule.matches(request):
                rule._consume()
                return None, "forward", True
        return None, "forward", False

    @staticmethod
    def _auth_fault(service: str) -> Fault:
        if service == "ec2":
            return Fault(
                401, "AuthFailure", "AWS was not able to validate the provided access credentials"
            )
        return FAULTS["invalid_client_token"]

    @staticmethod
    def _error_headers() -> list[tuple[str, str]]:
        return [
            ("Content-Type", "text/xml"),
            ("Date", formatdate(usegmt=True)),
            ("x-amzn-RequestId", str(uuid.uuid4())),
        ]

    def _forward(self, request: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(
            self._upstream_host, self._upstream_port, timeout=self._upstream_timeout
        )
        try:
            conn.putrequest(request.method, request.path, skip_host=True, skip_accept_encoding=True)
            chunked = False
            for name, value in request.headers:
                if name.lower() == "transfer-encoding":
                    chunked = True
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if chunked:
                conn.putheader("Content-Length", str(len(request.body)))
            conn.endheaders(request.body or None)
            response = conn.getresponse()
            body = response.read()
            return response.status, response.getheaders(), body
        finally:
            conn.close()

    def _account(self, key_id: str, status: int, code: str, origin: str) -> None:
        """OUTSCALE's lockout bookkeeping for the answer a request got (under the lock)."""
        if not self._outscale or not key_id or origin in ("inject", "lock", "outscale"):
            return
        options = self._options
        if status in (401, 403) and code in AUTH_FAILURE_CODES:
            state = self._auth.setdefault(key_id, _AuthState())
            state.failures += 1
            if state.failures % options.lock_threshold == 0:
                level = state.failures // options.lock_threshold
                period = min(options.lock_period * level, options.lock_max)
                state.locked_until = self.clock() + period
        elif origin == "upstream" and status < 500:
            self._auth.pop(key_id, None)  # the key authenticated: the run of failures ends

    def _learn(self, request: Request, status: int, body: bytes) -> None:
        """Key creation times, states and owners from the answers passing through."""
        if status != 200:
            return
        params = request.params
        if request.action == "CreateAccessKey":
            key = _tag(body, "AccessKeyId")
            user = _tag(body, "UserName") or params.get("UserName") or ""
            if key:
                self._created[key] = self.clock()
                self._key_status[key] = "active"
                if user:
                    self._key_user[key] = user
                    self._user_keys.setdefault(user, set()).add(key)
        elif request.action == "ListAccessKeys":
            owner = params.get("UserName") or self._key_user.get(request.key_id)
            listed: set[str] = set()
            for member in _MEMBER.findall(body):
                member_key = _tag(member, "AccessKeyId")
                if not member_key:
                    continue
                listed.add(member_key)
                member_user = _tag(member, "UserName") or owner
                owner = owner or member_user
                if member_user:
                    self._key_user[member_key] = member_user
                state = (_tag(member, "Status") or "").lower()
                if state:
                    self._key_status[member_key] = state
            if owner:
                self._user_keys[owner] = listed
        elif request.action == "UpdateAccessKey":
            key = params.get("AccessKeyId", "")
            if key:
                self._key_status[key] = params.get("Status", "").lower()
        elif request.action == "DeleteAccessKey":
            key = params.get("AccessKeyId", "")
            self._key_status.pop(key, None)
            self._key_user.pop(key, None)
            for keys in self._user_keys.values():
                keys.discard(key)

    def _rewrite(
        self, request: Request, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The answer as EIM would give it (under the lock)."""
        options = self._options
        encoded = any(
            name.lower() == "content-encoding" and value.lower() != "identity"
            for name, value in headers
        )
        if encoded:
            return status, headers, body
        new_status = status
        if status >= 400:
            code = _error_code(body)
            if code == "NoSuchEntity" and status == 404:
                new_status = options.no_such_entity_status
            elif code == "AccessDenied" and status == 403:
                new_status = options.access_denied_status
        else:
            body = _PAGINATION.sub(b"", body)
            if request.action == "CreateAccessKey":
                account = options.account.encode()

                def to_orn(found: re.Match[bytes]) -> bytes:
                    name = found.group(1)
                    if name.startswith(b"orn:"):
                        return found.group(0)
                    orn = b"orn:ows:idauth::" + account + b":user/" + name
                    return b"<UserName>" + orn + b"</UserName>"

                body = _USER_NAME.sub(to_orn, body, count=1)
        if new_status != status:
            headers = [
                (name, str(new_status) if name.lower() == "status" else value)
                for name, value in headers
            ]
        return new_status, headers, body
