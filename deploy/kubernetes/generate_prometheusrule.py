#!/usr/bin/env python3
"""Write prometheusrule.yaml from ../prometheus/rotator.rules.yml, the one source of the alerts.

kustomize cannot turn a Prometheus rules file into a PrometheusRule's spec (it copies strings,
not parsed YAML, and an exec generator needs alpha flags that plain ``kubectl apply -k`` lacks),
so the PrometheusRule is generated and committed, and ``--check`` (run by ``make deploy-check``
in CI) fails when it is out of date. Run it after editing the rules file.

Usage: generate_prometheusrule.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "rotator.rules.yml"
OUTPUT = HERE / "prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/rotator.rules.yml by generate_prometheusrule.py: do not edit.
# Edit the rules file, then run: python3 deploy/kubernetes/generate_prometheusrule.py
"""


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings (PromQL) as literal blocks, so the file stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_text: str) -> str:
    """The PrometheusRule manifest carrying exactly the groups of the rules file."""
    rules = yaml.safe_load(rules_text)
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "rotator", "labels": {"app.kubernetes.io/name": "rotator"}},
        "spec": {"groups": rules["groups"]},
    }
    body = yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=1000)
    return HEADER + body


def main(argv: list[str]) -> int:
    wanted = render(RULES.read_text(encoding="utf-8"))
    if argv[1:] == ["--check"]:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != wanted:
            print(
                f"{OUTPUT} is out of date with {RULES}: run python3 {Path(__file__).name}",
                file=sys.stderr,
            )
            return 1
        print(f"{OUTPUT.name}: up to date with {RULES.name}")
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    OUTPUT.write_text(wanted, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
