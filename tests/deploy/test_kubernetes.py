"""deploy/kubernetes and deploy/Containerfile: rendered by kustomize, validated, hardened."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator import config
from tests.deploy import tools

KUSTOMIZATION = tools.DEPLOY / "kubernetes"
RULES = tools.DEPLOY / "prometheus" / "rotator.rules.yml"
BUILT_IN_GROUPS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    kubectl = tools.find("kubectl")
    result = tools.run(kubectl, "kustomize", str(KUSTOMIZATION))
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("kustomize") / "rendered.yaml"
    path.write_text(result.stdout)
    return path, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def test_kustomization_renders_every_object(rendered: tuple[Path, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Namespace",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "rotator", obj["kind"]


def test_built_in_objects_pass_kubernetes_validate_strict(
    rendered: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    validate = tools.find("kubernetes-validate")
    _, objects = rendered
    built_in = [o for o in objects if o["apiVersion"] in BUILT_IN_GROUPS]
    assert len(built_in) == 7
    path = tmp_path / "built-in.yaml"
    path.write_text(yaml.safe_dump_all(built_in))
    result = tools.run(validate, "--strict", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") + result.stderr.count(
        "passed for resource"
    ) == len(built_in)


def test_kubernetes_validate_strict_rejects_an_unknown_field(
    rendered: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    validate = tools.find("kubernetes-validate")
    _, objects = rendered
    deployment = _one(objects, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["bogus"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    assert tools.run(validate, "--strict", str(path)).returncode != 0


def test_deployment_is_hardened_probed_and_bounded(
    rendered: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    deployment = _one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == _one(objects, "ServiceAccount")["metadata"]["name"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9109, "protocol": "TCP"}]
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    # The generated ConfigMap (name with its hash) is the one mounted.
    configmap = _one(objects, "ConfigMap")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap
    assert configmap.startswith("rotator-config-")


def test_service_monitor_pdb_and_network_policy_select_the_pods(
    rendered: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    pod_labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["name"] == "metrics"
    monitor = _one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service_labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    pdb = _one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = _one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": 9109, "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (443, "TCP")}


def test_prometheus_rule_carries_exactly_the_rules_file(
    rendered: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    rule = _one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_prometheus_rule_generator_is_up_to_date() -> None:
    script = KUSTOMIZATION / "generate_prometheusrule.py"
    result = tools.run(sys.executable, str(script), "--check")
    assert result.returncode == 0, result.stderr


def test_prometheus_rule_groups_pass_promtool(
    rendered: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The CRD's content, checked for structure by the tool that will load it."""
    promtool = tools.find("promtool")
    _, objects = rendered
    path = tmp_path / "from-prometheusrule.yml"
    path.write_text(yaml.safe_dump({"groups": _one(objects, "PrometheusRule")["spec"]["groups"]}))
    result = tools.run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_config_is_valid_and_uses_kubernetes_auth_and_mounted_files(
    rendered: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, objects = rendered
    text = _one(objects, "ConfigMap")["data"]["rotator.yaml"]
    path = tmp_path / "rotator.yaml"
    path.write_text(text)
    settings = config.load(path)
    assert settings.vault.auth.method == "kubernetes"
    assert settings.vault.auth.kubernetes is not None
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    token_source = next(v for v in pod["volumes"] if v["name"] == "vault-token")["projected"]
    token_path = token_source["sources"][0]["serviceAccountToken"]["path"]
    assert str(settings.vault.auth.kubernetes.token_file) == f"{mounts['vault-token']}/{token_path}"
    assert str(settings.eim.credentials_file) == f"{mounts['eim-credentials']}/eim-credentials"
    assert settings.metrics.port == 9109
    args = pod["containers"][0]["args"]
    assert args[args.index("-c") + 1] == f"{mounts['config']}/rotator.yaml"


def test_containerfile_passes_hadolint_and_runs_as_non_root() -> None:
    hadolint = tools.find("hadolint")
    containerfile = tools.DEPLOY / "Containerfile"
    result = tools.run(hadolint, str(containerfile))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = containerfile.read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] == "10001"
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert all(":" in b and not b.endswith(":latest") for b in bases)


def test_hadolint_would_report_an_unpinned_base(tmp_path: Path) -> None:
    hadolint = tools.find("hadolint")
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nRUN pip install rotator\n")
    assert tools.run(hadolint, str(bad)).returncode != 0


def test_the_pod_config_checks_on_an_admin_machine_with_skip_secret_files() -> None:
    # Its secret files exist only in the pod: a plain check names the file and the option.
    config_file = str(KUSTOMIZATION / "rotator.yaml")
    plain = tools.run(sys.executable, "-m", "rotator", "check-config", "-c", config_file)
    skipping = tools.run(
        sys.executable, "-m", "rotator", "check-config", "--skip-secret-files", "-c", config_file
    )

    assert plain.returncode == 2, plain.stdout + plain.stderr
    assert "eim.credentials_file: cannot read /etc/rotator-secrets/" in plain.stderr
    assert "--skip-secret-files checks the rest" in plain.stderr
    assert skipping.returncode == 0, skipping.stdout + skipping.stderr
    assert "OK, 1 target(s): monitoring" in skipping.stdout
    assert "secret files not read (--skip-secret-files)" in skipping.stdout
    assert "Traceback" not in plain.stderr + skipping.stderr
