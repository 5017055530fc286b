"""The cluster recipes: the launcher YAML against Ray's own schema, KubeRay manifests against the fields the
ray.io/v1 CRDs require, shell scripts through bash -n and shellcheck."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
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
                                    "launch/slurm.sh", "launch/install.sh", "launch/test.sh", ".ci/run",
                                    "bench/data_loader.sh", "bench/translate_en_fr.sh", "bench/gpu.sh"])
def test_shell_scripts_parse_and_pass_shellcheck(script):
    path = REPO / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    if script.endswith("sbatch"):
        text = path.read_text()
        assert "ray start --head" in text and "ctxtrain train" in text and "--address" in text


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def test_slurm_script_passes_sigterm_to_the_driver_and_requeues_a_preempted_run(tmp_path):
    """cluster/slurm.sbatch run by bash as Slurm would, with stand-ins for what exists only on a Slurm cluster
    (srun, scontrol, ray start) and a driver that behaves as `ctxtrain train` does on SIGTERM (a checkpoint,
    then exit 75): the script's SIGTERM reaches the driver, the script waits for it and requeues the job."""
    text = (REPO / "cluster" / "slurm.sbatch").read_text()
    lead = int(text.split("#SBATCH --signal=B:TERM@", 1)[1].split()[0])
    grace = float(text.split("--cluster.preempt_grace_s=", 1)[1].split()[0])
    assert lead > grace and "#SBATCH --requeue" in text
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", f'if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> {log}; fi')
    _stub(bin_dir, "srun", 'for a in "$@"; do [ "$a" = --ip-address ] && { echo 127.0.0.1; exit 0; }; done; '
                           'exec /bin/sleep 600 >/dev/null 2>&1')
    _stub(bin_dir, "ray", "exit 0")
    _stub(bin_dir, "sleep", "exit 0")  # the script's waits for Ray to come up
    _stub(bin_dir, "ctxtrain", f'echo "driver $*" >> {log}; '
                               f'trap \'/bin/sleep 1; echo "driver saved" >> {log}; exit 75\' TERM; '
                               'while true; do /bin/sleep 0.1; done')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1",
           "CTXTRAIN_VENV": str(tmp_path / "none")}
    proc = subprocess.Popen(["bash", str(REPO / "cluster" / "slurm.sbatch"), "configs/lm_tiny.yaml"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (log.exists() and "driver" in log.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    subprocess.run(["pkill", "-f", f"{bin_dir}/srun"], check=False)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, out
    assert lines[0].startswith("driver train configs/lm_tiny.yaml --address 127.0.0.1:6379"), lines
    assert lines[1:] == ["driver saved", "scontrol requeue 4242"], lines


def test_kuberay_pods_give_a_preempted_worker_time_to_checkpoint():
    """Evicted pods: the grace period outlasts cluster.preempt_grace_s, and a preStop hook SIGTERMs the
    training processes (the workers checkpoint at the next step; the head's driver exits 75 and the RayJob
    retries)."""
    from ctxtrain.config import ClusterConfig

    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        doc = yaml.safe_load((CLUSTER / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod["terminationGracePeriodSeconds"] > ClusterConfig().preempt_grace_s
            command = " ".join(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
            assert "pkill -TERM" in command, command
        if doc["kind"] == "RayJob":
            assert doc["spec"]["backoffLimit"] >= 3


def test_grafana_dashboard_plots_every_training_gauge_and_only_those():
    """cluster/grafana_ctxtrain.json: one panel per gauge that rank 0 exports (Prometheus adds Ray's ray_
    prefix), each filtered by the run and job variables, which are read from the step gauge's labels."""
    import re

    from ctxtrain.launcher import RAY_GAUGES

    dash = json.loads((CLUSTER / "grafana_ctxtrain.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    plotted = {re.match(r"ray_(\w+)\{", e).group(1) for e in exprs}
    assert plotted == {name for name, _ in RAY_GAUGES.values()}
    assert all('run=~"$run"' in e and 'job_id=~"$job_id"' in e for e in exprs)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["run"]["definition"] == "label_values(ray_ctxtrain_step, run)"
    boxes = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dash["panels"]]
    assert len(set(boxes)) == len(boxes)  # no panel on top of another
