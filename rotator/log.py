"""structlog setup: one pipeline for rotator's events and every library's ``logging`` records.

Off a terminal each line is one JSON object (``event``, ``level``, ``timestamp`` in UTC with a
``Z``, ``logger`` for library records, and the key=value facts); on a terminal structlog's
console renderer. The last step before rendering is redaction: whatever looks like a secret, a
Vault token, a request signature or the value of a ``Secret`` ever created is replaced by
``**********``, in every field, nested container and exception traceback, at every level. Key ids
(``AKIA...``) are kept: operators need them.

This module must never import a client library (boto3, hvac, apscheduler, prometheus_client).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Mapping
from typing import Any, Final, TextIO, cast

import structlog
from structlog.types import EventDict, ExcInfo, Processor, WrappedLogger

from rotator import model

MASK: Final = "**********"

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS: Final = ("json", "console")

# Chatty libraries: their INFO is noise for an operator, their DEBUG is for debugging only.
LIBRARY_LOGGERS: Final = ("botocore", "boto3", "urllib3", "apscheduler", "hvac", "s3transfer")

# --- redaction -------------------------------------------------------------------------------

# A key whose name ends with one of these holds a secret (compared lower-case, "-" as "_").
# "secret_path", "token_file", "secret_id_file", "token_ttl", "access_key_id" do not match.
_SECRET_NAME_SUFFIXES: Final = (
    "secret",
    "secret_access_key",
    "secretaccesskey",
    "secret_key",
    "secret_id",
    "password",
    "passwd",
    "token",
    "authorization",
    "jwt",
    "signature",
    "private_key",
    "api_key",
    "cookie",
    "credentials",
)
_SECRET_NAME_RE: Final = "|".join(
    sorted((re.escape(s).replace("_", "[_-]?") for s in _SECRET_NAME_SUFFIXES), key=len)[::-1]
)


def _is_secret_name(name: str) -> bool:
    key = name.lower().replace("-", "_")
    return key.endswith(_SECRET_NAME_SUFFIXES)


def _is_sigv4(value: str) -> bool:
    # A SigV4 Authorization value: Credential=<key id>/<scope> is useful and harmless, its
    # Signature=... is masked by its own pattern.
    return value.startswith("AWS4-HMAC-SHA256")


def _mask_value(match: re.Match[str]) -> str:
    """Keep the ``name=`` / ``"name": "`` prefix and any quote, mask the value itself."""
    value = match.group("qv") if match.group("quote") is not None else match.group("uv")
    if value in ("", "null", "None", "true", "false", "True", "False") or _is_sigv4(value):
        return match.group(0)
    return match.group("pre") + (match.group("quote") or "") + MASK


def _mask_authorization(match: re.Match[str]) -> str:
    value = match.group("value")
    if _is_sigv4(value):
        return match.group(0)
    scheme = re.match(r"(?i)(bearer|basic|token|negotiate|digest)\s+", value)
    return match.group("pre") + (scheme.group(0) if scheme else "") + MASK


def _mask_aws_secret(match: re.Match[str]) -> str:
    text = match.group(0)
    # Base64-ish AWS secrets and OUTSCALE's [A-Z0-9]{40} have an upper-case letter and a digit;
    # lower-case paths and hex digests (a sha1) of the same length are left alone.
    if re.search(r"[A-Z]", text) and re.search(r"[0-9]", text):
        return MASK
    return text


# (pattern, replacement) applied in order to every string.
_PATTERNS: Final[tuple[tuple[re.Pattern[str], Any], ...]] = (
    # Authorization: <value> as a header line, or 'Authorization': b'<value>' in a dict repr.
    (
        re.compile(r"""(?P<pre>(?i:authorization)["']?\s*[:=]\s*b?["']?)(?P<value>[^"'\r\n]+)"""),
        _mask_authorization,
    ),
    # SigV4 signatures in any form: the header's Signature=..., presigned X-Amz-Signature=...,
    # botocore.auth's debug line "Signature:\n<hex>", a "Signature": "..." in a dict or JSON.
    # A separator must follow the word: "SignatureDoesNotMatch" is not a signature.
    (
        re.compile(r"""(?i)(\b(?:x-amz-)?signature["']?\s*[=:]\s*b?["']?)[^\s&,;'"]+"""),
        rf"\g<1>{MASK}",
    ),
    # <SecretAccessKey>...</SecretAccessKey> in an IAM XML answer (botocore debug logs bodies).
    (
        re.compile(r"(?i)(<(?:SecretAccessKey|SessionToken|Password)>)[^<]*(</)"),
        rf"\g<1>{MASK}\g<2>",
    ),
    # "name": "value" / 'name': 'value' (JSON, dict repr) for a secret-looking name.
    (
        re.compile(
            rf"""(?P<pre>(["'])[\w-]*(?i:{_SECRET_NAME_RE})\2\s*:\s*b?)"""
            r"""(?:(?P<quote>["'])(?P<qv>[^"'\r\n]*)|(?P<uv>[^\s"',;}\]<>]+))"""
        ),
        _mask_value,
    ),
    # name=value (form bodies, query strings, shell/ini style) and the X-Vault-Token: header.
    (
        re.compile(
            rf"""(?P<pre>(?<![\w-])(?:[\w-]*(?i:{_SECRET_NAME_RE})\s*=|(?i:x-vault-token)\s*:)"""
            r"""\s*b?)(?:(?P<quote>["'])(?P<qv>[^"'\r\n]*)|(?P<uv>[^\s"'&,;}\]<>]+))"""
        ),
        _mask_value,
    ),
    # Vault / OpenBao tokens: hvs./hvb./hvr. (current), s./b./r. (legacy) and their batch forms.
    (re.compile(r"(?<![\w.])(?:hv[sbr]\.[A-Za-z0-9_\-]{20,}|[sbr]\.[A-Za-z0-9]{20,})"), MASK),
    # A 40-character AWS/OUTSCALE style secret access key standing alone.
    (re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"), _mask_aws_secret),
)


def _mask_known(text: str) -> str:
    """``text`` with every occurrence of every remembered ``Secret`` value masked.

    Each stretch of text covered by occurrences that overlap becomes one mask, so no part of
    any occurrence survives, whether one value contains another or two merely overlap.
    """
    found = model.Secret.find_in(text)
    if not found:
        return text
    spans: list[tuple[int, int]] = []
    for value in found:
        start = text.find(value)
        while start >= 0:
            spans.append((start, start + len(value)))
            start = text.find(value, start + 1)
    spans.sort()
    parts: list[str] = []
    done = 0  # text[:done] is copied or masked already
    for start, end in spans:
        if start < done:  # overlaps the stretch just masked: extend it
            done = max(done, end)
        else:
            parts += (text[done:start], MASK)
            done = end
    return "".join(parts) + text[done:]


def redact(text: str) -> str:
    """``text`` with every known secret value and every secret-looking substring masked."""
    text = _mask_known(text)
    if len(text) < _PATTERN_MIN_CHARS and not any(c in text for c in "=:<"):
        return text  # too short for a bare token or key, and no name=value, name: value, <Tag>
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# The shortest text a pattern without "=", ":" or "<" can match: a legacy Vault token
# ("s." and 20 characters); the bare secret key pattern needs 40.
_PATTERN_MIN_CHARS: Final = 22


_MAX_DEPTH: Final = 16


def _redact_object(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, model.Secret):
        return MASK
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {k: _redact_item(k, v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            items = [_redact_object(v, depth + 1) for v in value]
            return tuple(items) if isinstance(value, tuple) else items
    # Any other object is rendered through str() (JSON) or repr() (console): if either text
    # carries something secret, hand the renderer the redacted text instead of the object.
    as_str, as_repr = str(value), repr(value)
    if redact(as_str) != as_str or redact(as_repr) != as_repr:
        return redact(as_str)
    return value


def _redact_item(key: object, value: Any, depth: int) -> Any:
    if (
        isinstance(key, str)
        and _is_secret_name(key)
        and not (value is None or isinstance(value, bool | int | float))
        and not (isinstance(value, str) and _is_sigv4(value))
    ):
        return MASK
    return _redact_object(value, depth)


def redact_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact every value of the event dict (see ``redact``)."""
    return {k: _redact_item(k, v, 0) for k, v in event_dict.items()}


def _exc_info_tuple(value: Any) -> ExcInfo | None:
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and value[0] is not None:
        return cast(ExcInfo, value)
    if value is True:
        info = sys.exc_info()
        return None if info[0] is None else cast(ExcInfo, info)
    return None


def format_exception(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Turn ``exc_info`` into a plain traceback string under ``exception``, to be redacted.

    A stdlib record's ``stack_info`` becomes ``stack`` (structlog's own events have it already).

    Replaces structlog's pretty console tracebacks on purpose: those print local variables,
    where a revealed secret may sit, and run after the redaction step.
    """
    stack_info = event_dict.pop("stack_info", None)
    if isinstance(stack_info, str):  # a stdlib record's stack_info, already rendered
        event_dict["stack"] = stack_info
    exc_info = event_dict.pop("exc_info", None)
    info = _exc_info_tuple(exc_info)
    if info is not None:
        event_dict["exception"] = "".join(traceback.format_exception(*info)).rstrip("\n")
    return event_dict


# Attributes every LogRecord has, plus those a Formatter adds when another handler (pytest's
# capture, a user's file handler) formatted the shared record first.
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("name", 0, "path", 0, "msg", (), None).__dict__
) | {"message", "asctime"}


def _add_record_extras(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """A library record's ``extra={...}`` fields become facts (structlog's ExtraAdder would also
    copy ``message``, which a handler that ran first may have set)."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in event_dict:
                event_dict[key] = value
    return event_dict


_FIRST_KEYS: Final = ("timestamp", "level", "event", "logger", "target")


def _order_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Put the fixed fields first so a JSON line reads like a log line."""
    first = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    return {**first, **event_dict}


# --- configuration ---------------------------------------------------------------------------


class _Handler(logging.StreamHandler[TextIO]):
    """The root handler this module installs; recognised (and replaced) by a later configure()."""


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def configure(*, format: str | None, level: str, stream: TextIO | None = None) -> None:
    """Set up structlog and the stdlib root logger; calling it again replaces the previous setup.

    ``format``: ``"json"``, ``"console"``, or ``None`` for console on a terminal, JSON otherwise.
    ``level``: debug, info, warning, error or critical (any case). ``stream``: default stderr.
    """
    out: TextIO = stream if stream is not None else sys.stderr
    level_no = LEVELS.get(level.strip().lower())
    if level_no is None:
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error, critical")
    tty = _is_tty(out)
    fmt = format if format is not None else ("console" if tty else "json")
    if fmt not in FORMATS:
        raise ValueError(f"log format {format!r} is not one of json, console")

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_record_extras,
        timestamper,
    ]
    renderer: Processor
    last: list[Processor]
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        last = [_order_keys, renderer]
    else:
        colors = tty and "NO_COLOR" not in os.environ
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
        last = [renderer]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            format_exception,
            redact_event,  # last before rendering, so nothing added later escapes it
            *last,
        ],
    )
    handler = _Handler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level_no)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.NOTSET if level_no <= logging.DEBUG else max(level_no, logging.WARNING)
        )

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: module-level loggers must follow a later configure() (reload, tests).
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (use the module's ``__name__``)."""
    return structlog.stdlib.get_logger(name)
