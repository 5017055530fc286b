"""The machine's accelerators as ctxtrain asks for them: DeepSpeed's CPU accelerator only where there is no
CUDA device (a GPU cannot exist here: the device query is replaced), a mismatch between DS_ACCELERATOR and the
worker's device in one line, the usable memory of a card, the loopback interface for gloo and NCCL."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ctxtrain import devices
from ctxtrain.errors import UserError
from tests.conftest import REPO


def test_ds_accelerator_is_cpu_only_where_there_is_no_cuda_device(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert devices.cpu_only_env() == {}  # a GPU machine: DeepSpeed finds CUDA itself
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert devices.cpu_only_env() == {"DS_ACCELERATOR": "cpu"}


def test_the_test_runner_sets_the_cpu_accelerator_through_the_same_query():
    """launch/test.sh asks ctxtrain.devices.cuda_available; with a CUDA device (here: the query answering
    True) it leaves DS_ACCELERATOR unset, without one it exports cpu."""
    script = (REPO / "launch" / "test.sh").read_text()
    start = script.index("if ! python -c")
    block = script[start:script.index("fi\n", start) + 3]
    for answer, expect in (("True", ""), ("False", "cpu")):
        stub = f"import ctxtrain.devices as d; d.cuda_available = lambda: {answer}\n"
        probe = block.replace("from ctxtrain.devices import cuda_available;",
                              f"exec({stub!r}); from ctxtrain.devices import cuda_available;")
        env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
        env["PYTHONPATH"] = str(REPO / "src")
        out = subprocess.run(["bash", "-c", f"{probe}\necho \"DS=${{DS_ACCELERATOR:-}}\""],
                             capture_output=True,
                             text=True, env={**env,
                                             "PATH": f"{os.path.dirname(sys.executable)}:{env['PATH']}"})
        assert out.stdout.strip() == f"DS={expect}", (answer, out.stdout, out.stderr)


def test_a_mismatch_of_accelerator_and_device_is_one_line(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    devices.check_accelerator("cpu")
    with pytest.raises(UserError, match="DS_ACCELERATOR=cpu but this worker trains on its GPU"):
        devices.check_accelerator("cuda")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    devices.check_accelerator("cuda")
    with pytest.raises(UserError, match="has no GPU and trains on the CPU"):
        devices.check_accelerator("cpu")
    monkeypatch.delenv("DS_ACCELERATOR")
    devices.check_accelerator("cuda")


def test_a_cards_nameplate_becomes_its_usable_memory():
    assert devices.usable_gib(141)[0] == pytest.approx(140.4) and "H200" in devices.usable_gib(141)[1]
    assert devices.usable_gib(80)[0] == pytest.approx(79.6)
    assert devices.usable_gib(70.5) == (70.5, "--gpu-mem 70.5 GiB taken as one GPU's usable memory")
    assert devices.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert devices.peak_tflops("NVIDIA H100 PCIe") == 756.0 and devices.peak_tflops("Quadro") is None


def test_single_node_process_groups_use_the_loopback_interface_for_gloo_and_nccl():
    from ctxtrain.processes import LOOPBACK_ENV

    assert LOOPBACK_ENV == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def test_workers_get_expandable_segments_unless_the_user_set_the_allocator():
    code = "import os, ctxtrain.engine.core; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    env["PYTHONPATH"] = str(REPO / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "expandable_segments:True", out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"})
    assert out.stdout.strip() == "max_split_size_mb:512", out.stderr[-2000:]
