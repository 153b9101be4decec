"""infra/ is validated: compose file against the Compose spec schema, Kubernetes manifests against the
Kubernetes API and dask-kubernetes CRD schemas (SLURM clusters are the library's own: tests/test_cluster_engines.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def package_file(package: str, *parts: str) -> Path:
    return Path(importlib.util.find_spec(package).origin).parent.joinpath(*parts)


def test_compose_file_matches_the_compose_spec_and_wires_services():
    doc = yaml.safe_load((INFRA / "docker-compose.yml").read_text())  # resolves the <<: anchors like compose
    schema = json.loads(package_file("compose", "config", "compose_spec.json").read_text())
    jsonschema.validate(doc, schema, cls=jsonschema.Draft201909Validator)
    services = doc["services"]
    assert {"prefect-server", "dask-scheduler", "cpu-worker", "gpu-worker"} <= set(services)
    scheduler_port = services["dask-scheduler"]["command"][services["dask-scheduler"]["command"].index("--port") + 1]
    for name in ("cpu-worker", "gpu-worker"):
        cmd = services[name]["command"]
        assert cmd[:2] == ["dask", "worker"] and cmd[2] == f"tcp://dask-scheduler:{scheduler_port}"
        assert services[name]["environment"]["MALLOC_TRIM_THRESHOLD_"] == "-1"
        assert "data:/data" in services[name]["volumes"]
    gpu = services["gpu-worker"]
    assert gpu["command"][gpu["command"].index("--resources") + 1] == "GPU=1"  # what segpipe's model tasks request
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert (ROOT / services["cpu-worker"]["build"]["context"].replace("..", ".")
            / services["cpu-worker"]["build"]["dockerfile"]).is_file()
    assert set(doc["volumes"]) >= {"data", "prefect"}
    runner = services["flow-runner"]["command"]
    assert runner[:3] == ["python", "-m", "segpipe_flows.deploy"] and (ROOT / "segpipe_flows" / "deploy.py").is_file()


def _crd_schema(kind: str) -> dict:
    """The dask-kubernetes operator's CRD schema with its python:// references resolved to one document."""
    templates = yaml.safe_load(package_file("dask_kubernetes", "operator", "customresources",
                                            "templates.yaml").read_text())["definitions"]
    k8s_dir = package_file("kubernetes_validate", "kubernetes-json-schema", "v1.33.0-local-strict")
    k8s = json.loads((k8s_dir / "_definitions.json").read_text())["$defs"]

    def fix(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("python://"):
                return {"$ref": "#/$defs/" + ref.split("#/definitions/")[1]}
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    crd = yaml.safe_load(package_file("dask_kubernetes", "operator", "customresources",
                                      f"{kind.lower()}.yaml").read_text())
    root = fix(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return {**root, "$defs": {**k8s, **fix(templates)}}


@pytest.mark.parametrize("path,kind", [("daskcluster.yaml", "DaskCluster"), ("gpu-workers.yaml", "DaskWorkerGroup")])
def test_dask_operator_manifests_match_the_operator_crds(path, kind):
    doc = yaml.safe_load((INFRA / "k8s" / path).read_text())
    assert doc["apiVersion"] == "kubernetes.dask.org/v1" and doc["kind"] == kind
    jsonschema.validate(doc, _crd_schema(kind), cls=jsonschema.Draft202012Validator)
    pods = [doc["spec"]["worker"]["spec"]] + ([doc["spec"]["scheduler"]["spec"]] if kind == "DaskCluster" else [])
    for pod in pods:
        for c in pod["containers"]:
            assert c["args"][:2] in (["dask", "worker"], ["dask", "scheduler"])
    if kind == "DaskWorkerGroup":
        c = doc["spec"]["worker"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and "GPU=1" in c["args"]
        assert doc["spec"]["cluster"] == yaml.safe_load((INFRA / "k8s" / "daskcluster.yaml").read_text())[
            "metadata"]["name"]


def test_a_broken_manifest_is_caught():
    doc = yaml.safe_load((INFRA / "k8s" / "daskcluster.yaml").read_text())
    doc["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"] = "lots"
    with pytest.raises(jsonschema.ValidationError, match="lots"):
        jsonschema.validate(doc, _crd_schema("DaskCluster"), cls=jsonschema.Draft202012Validator)
    doc = yaml.safe_load((INFRA / "k8s" / "daskcluster.yaml").read_text())
    doc["spec"]["worker"]["spec"]["containers"][0]["imagePullPolicty"] = "Always"  # a typo: strict schema refuses it
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicty"):
        jsonschema.validate(doc, _crd_schema("DaskCluster"), cls=jsonschema.Draft202012Validator)


def test_prefect_server_manifests_are_valid_kubernetes():
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "prefect-server.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Deployment", "Service"]
    for d in docs:
        kubernetes_validate.validate(d, "1.33", strict=True)
    claim = docs[0]["metadata"]["name"]
    for path in ("daskcluster.yaml", "gpu-workers.yaml"):
        spec = yaml.safe_load((INFRA / "k8s" / path).read_text())["spec"]["worker"]["spec"]
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
