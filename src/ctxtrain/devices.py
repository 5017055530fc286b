"""The accelerators of this machine, asked once: is there a CUDA device, which DeepSpeed accelerator matches
the device a worker trains on, how much of a card is usable, and its dense bf16 peak.

No torch import unless a GPU driver's device node exists: the driver, `plan` and the test runner ask this too.
"""

from __future__ import annotations

import os
from typing import Optional

from ctxtrain.errors import UserError

GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL


def cuda_available() -> bool:
    """A CUDA (or ROCm) device that torch can use is here."""
    if not any(os.path.exists(p) for p in GPU_DEVICE_NODES):
        return False  # no GPU driver's device node: no GPU, and no torch import to ask
    import torch

    return torch.cuda.is_available()


def cpu_only_env() -> dict[str, str]:
    """The environment that DeepSpeed needs on a machine without a CUDA device: its CPU accelerator. Empty
    where there is one (DeepSpeed then finds CUDA itself; forcing `cpu` there would put the engine on the CPU
    while the batches go to the GPU)."""
    return {} if cuda_available() else {"DS_ACCELERATOR": "cpu"}


def check_accelerator(device_type: str) -> None:
    """One line when DS_ACCELERATOR names another kind of device than the one this worker trains on: DeepSpeed
    would build the engine on one while the batches go to the other."""
    wanted = os.environ.get("DS_ACCELERATOR")
    if not wanted or (wanted == "cpu") == (device_type == "cpu"):
        return
    if wanted == "cpu":
        raise UserError("DS_ACCELERATOR=cpu but this worker trains on its GPU (train.device); unset "
                        "DS_ACCELERATOR (ctxtrain sets it only where there is no GPU), or set "
                        "train.device=cpu")
    raise UserError(f"DS_ACCELERATOR={wanted} but this worker has no GPU and trains on the CPU; unset "
                    "DS_ACCELERATOR (ctxtrain sets cpu itself where there is no GPU)")


# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor datasheets, without sparsity); most specific names
# first.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}

# A card's nameplate -> (the card, the total GiB that torch.cuda.mem_get_info reports for it): the rest
# is the driver's and the ECC's, never the job's.
USABLE_GIB = {80: ("an H100", 79.6), 141: ("an H200", 140.4)}


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU by its device name, or None for a card not in the table."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def usable_gib(given: float) -> tuple[float, str]:
    """The usable memory for a --gpu-mem: a card's nameplate (80, 141) becomes what such a card reports free;
    any other figure is taken as usable already. Returns (GiB, the assumption in words)."""
    if given in USABLE_GIB:
        which, usable = USABLE_GIB[given]
        return usable, (f"--gpu-mem {given:g} is the nameplate of {which}; assumed its usable {usable:g} GiB "
                        "(the total torch.cuda.mem_get_info reports for such a card)")
    return given, f"--gpu-mem {given:g} GiB taken as one GPU's usable memory"
