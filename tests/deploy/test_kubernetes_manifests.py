"""deploy/kubernetes/: every manifest valid against the Kubernetes API schemas (offline, strict:
unknown fields are errors), and wired together: probes on the real model-ready endpoint, the
Service and autoscaler on the Deployment, a metric the toolkit publishes, ports that exist."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "deploy" / "kubernetes"
VERSIONS = ["1.29.0", "1.33.0"]  # the oldest and a recent minor release still maintained by most clouds


def manifests() -> dict[str, dict]:
    documents = {}
    for path in sorted(FOLDER.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[f"{document['kind']}/{document['metadata']['name']}"] = document
    return documents


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    documents = manifests()
    assert {"Deployment/rotary-triton", "Service/rotary-triton", "HorizontalPodAutoscaler/rotary-triton",
            "PodDisruptionBudget/rotary-triton", "PersistentVolumeClaim/rotary-model-repository"} <= set(documents)
    for name, document in documents.items():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} is not a valid Kubernetes {version} object: {error.message} at {list(error.path)}")


def test_a_broken_manifest_is_caught():
    """The check bites: an unknown field and a wrong type are both refused."""
    deployment = manifests()["Deployment/rotary-triton"]
    for broken in ({**deployment, "spec": {**deployment["spec"], "replica": 2}},
                   {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_objects_are_wired_to_each_other_and_to_what_the_toolkit_serves():
    from runtime.serving.triton_model import METRICS
    from runtime.serving.repository import GENERATE

    documents = manifests()
    deployment = documents["Deployment/rotary-triton"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": f"/v2/models/{GENERATE}/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    exit_timeout = next(int(a.split("=")[1]) for a in container["args"] if a.startswith("--exit-timeout-secs="))
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + exit_timeout  # drain completes before the kill
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert any(a == f"--model-repository={mounts['model-repository']}/repository" for a in container["args"])
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "model-repository")["persistentVolumeClaim"]
    assert f"PersistentVolumeClaim/{claim['claimName']}" in documents

    service = documents["Service/rotary-triton"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} == set(ports)
    autoscaler = documents["HorizontalPodAutoscaler/rotary-triton"]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                    "name": "rotary-triton"}
    published = {name for name, _, _ in METRICS.values()}
    assert {metric["pods"]["metric"]["name"] for metric in autoscaler["spec"]["metrics"]} <= published
    budget = documents["PodDisruptionBudget/rotary-triton"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
