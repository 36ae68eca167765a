"""The metric names rotator really exports, and the ones a PromQL expression uses."""

from __future__ import annotations

import re

from rotator import metrics

# Series Prometheus makes itself, not rotator.
PROMETHEUS_SERIES = frozenset({"up"})

_ROTATOR_NAME = re.compile(r"\brotator_[a-zA-Z0-9_:]*")
_SELECTOR_NAME = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")


def exported() -> frozenset[str]:
    """Every sample name a Metrics() registry can expose (counter _total, histogram suffixes)."""
    registry = metrics.Metrics().registry
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return frozenset(names)


def used_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: rotator_* tokens and names before a {selector}."""
    # Label values in quotes are not names ({component="eim"}); the label names inside braces
    # are not followed by "{", so only the selector's metric name is.
    unquoted = re.sub(r'"[^"]*"', '""', expr)
    return set(_ROTATOR_NAME.findall(unquoted)) | set(_SELECTOR_NAME.findall(unquoted))
