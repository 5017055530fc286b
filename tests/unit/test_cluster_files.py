"""The cluster recipes: the launcher YAML against Ray's own schema, KubeRay manifests against the fields the
ray.io/v1 CRDs require, shell scripts through bash -n and shellcheck."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def test_launcher_yaml_validates_against_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    workers = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert workers, "the launcher config must have a GPU worker type"
    assert config["head_node_type"] in config["available_node_types"]
    # the schema really is checked: a broken config fails it
    broken = dict(config)
    broken["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _check_pod_template(template: dict, where: str):
    containers = template["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container needs a name and an image"


def _check_cluster_spec(spec: dict, where: str):
    """Fields RayCluster's spec needs in ray.io/v1 (rayStartParams was required before KubeRay 1.2)."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _check_pod_template(head["template"], f"{where}.headGroupSpec")
    assert spec["workerGroupSpecs"], f"{where}: no worker group"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        _check_pod_template(group["template"], f"{where}.{group['groupName']}")
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) > 0


def test_kuberay_raycluster_manifest():
    doc = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob_manifest_runs_ctxtrain_train():
    doc = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    assert doc["spec"]["entrypoint"].split()[:2] == ["ctxtrain", "train"]
    _check_cluster_spec(doc["spec"]["rayClusterSpec"], "RayJob.rayClusterSpec")
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


@pytest.mark.parametrize("script", ["cluster/slurm.sbatch", "launch/quickstart.sh", "launch/submit.sh",
                                    "launch/slurm.sh", "launch/install.sh", "launch/test.sh", ".ci/run"])
def test_shell_scripts_parse_and_pass_shellcheck(script):
    path = REPO / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    if script.endswith("sbatch"):
        text = path.read_text()
        assert "ray start --head" in text and "ctxtrain train" in text and "--address" in text
