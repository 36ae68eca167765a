"""The project's own error tree.

Adapters translate every client-library exception into one of these (``raise ... from exc``), so
no boto or hvac exception crosses into the engine. Two questions decide how an error is handled:

- ``transient``: worth retrying on the next pass (throttling, 5xx, timeouts, Vault sealed or
  unreachable); otherwise permanent (denied, no such entity, quota) and reported, not hot-looped;
- ``component``: which part failed, the ``component`` label of ``rotator_errors_total``.

Messages say what to do about the problem. They never contain a secret, token or signature.
"""

from __future__ import annotations


class RotatorError(Exception):
    """Base of every error rotator raises on purpose."""

    component: str = "rotator"
    transient: bool = False


class ConfigError(RotatorError):
    """The configuration is invalid; ``path`` names the offending key (``targets[0].grace``)."""

    component = "config"

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


# --- EIM / IAM -------------------------------------------------------------------------------


class EimError(RotatorError):
    """An EIM (IAM) call failed."""

    component = "eim"

    def __init__(self, message: str, *, code: str = "", action: str = "") -> None:
        self.code = code
        self.action = action
        super().__init__(message)


class EimTransientError(EimError):
    """Throttling, a 5xx answer, a timeout or a connection failure: retried on a later pass."""

    transient = True


class EimNoSuchEntity(EimError):
    """The user, group, policy or key named does not exist."""


class EimAlreadyExists(EimError):
    """The entity exists already (a concurrent pass created it)."""


class EimAccessDenied(EimError):
    """The rotator's own credentials may not perform the action: a permission is missing."""


class EimAuthenticationError(EimError):
    """The rotator's own credentials do not authenticate (unknown key, wrong secret)."""


class EimQuotaExceeded(EimError):
    """A quota was hit: too many access keys for the user, or too many policy versions."""


class EimUnsupported(EimError):
    """The endpoint does not implement the action (OUTSCALE answers ``InvalidAction``)."""


class EimInvalidRequest(EimError):
    """The request was refused as malformed (for example a policy document EIM does not accept)."""


# --- Vault -----------------------------------------------------------------------------------


class VaultError(RotatorError):
    """A Vault call failed."""

    component = "vault"


class VaultUnavailable(VaultError):
    """Vault is unreachable, sealed, or answered 5xx: no IAM change is made until it is back."""

    transient = True


class VaultDenied(VaultError):
    """Vault refused the token (expired, revoked) or a policy denies the path."""


class VaultConflict(VaultError):
    """A check-and-set write lost against a concurrent writer: the data read is stale."""

    transient = True


class StateSchemaError(VaultError):
    """The rotator state in Vault has a schema this version does not understand.

    Permanent by design: treating an unknown document as "no state" could orphan or delete keys.
    """


class StateStale(VaultError):
    """The state is older than what IAM and the published secret show (rolled back by hand):
    acting on it would publish an older key over a newer one. Permanent: the operator decides."""


class StateDeleted(StateSchemaError):
    """The latest version of a state was deleted or destroyed (``kv delete``, or Vault's
    ``delete_version_after``). Permanent, as an unknown schema: taken for "no state", the keys
    it tracks would count as foreign and the retiring ones never be retired."""


class LockError(RotatorError):
    """The per-target lock could not be taken or was lost."""

    component = "lock"
    transient = True


# What OpenSSL says when the server answers a TLS handshake in plain HTTP (OpenSSL 3.2 and
# later say "record layer failure"; before, WRONG_VERSION_NUMBER).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "wrong version number", "record layer failure")


def speaks_no_tls(exc: BaseException) -> bool:
    """Whether a TLS failure is a server that does not speak TLS at all (an https:// address
    for a plain-HTTP server), not a certificate problem."""
    text = str(exc)
    return any(sign in text for sign in _NOT_TLS)
