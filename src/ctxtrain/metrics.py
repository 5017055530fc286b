"""Throughput, MFU and memory, measured honestly; the steps between two log lines kept on the device.

MFU = (training FLOPs per token x tokens/s of the job) / (number of accelerators x dense bf16 peak of one).
FLOPs per token: `ctxtrain.model.flops` (6 N + 6 L d T, causal attention counted once). The peak is
`train.peak_tflops` when given, else looked up from the GPU's name below; on CPU, and on a GPU we do
not know, MFU is None (null in metrics.jsonl) rather than a number against an invented peak.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Optional

import torch


def peak_flops(device: torch.device, configured_tflops: Optional[float]) -> Optional[float]:
    """FLOP/s of one accelerator for MFU, or None when there is no honest number (CPU, unknown GPU)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    from ctxtrain.devices import peak_tflops

    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int,
        peak: Optional[float]) -> Optional[float]:
    if peak is None or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (n_devices * peak)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had (what GNU `time -f %M` reports for it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(device: torch.device, rss_baseline: int = 0) -> dict:
    """mem_bytes (peak GPU allocation since the last reset, or process RSS on CPU) and the details.

    mem_peak_bytes is what `ctxtrain plan` predicts: on GPU the peak allocation of the step; on CPU the peak
    RSS growth of the process over rss_baseline (its RSS before the model was built)."""
    if device.type == "cuda":
        out = {
            "mem_bytes": torch.cuda.max_memory_allocated(device),
            "mem_allocated_bytes": torch.cuda.memory_allocated(device),
            "mem_reserved_bytes": torch.cuda.memory_reserved(device),
            "mem_peak_bytes": torch.cuda.max_memory_allocated(device),
            "mem_rss_bytes": rss_bytes(),
        }
        return out
    rss = rss_bytes()
    return {"mem_bytes": rss, "mem_rss_bytes": rss, "mem_allocated_bytes": None, "mem_reserved_bytes": None,
            "mem_peak_bytes": peak_rss_bytes() - rss_baseline}


class Stopwatch:
    """Accumulates named durations within a step (data wait, forward/backward, checkpoint save)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def time(self, name: str):
        watch = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                watch.totals[name] = watch.totals.get(name, 0.0) + time.perf_counter() - self.t0

        return _Span()

    def pop(self, name: str) -> float:
        return self.totals.pop(name, 0.0)


class PendingSteps:
    """The steps since the last log line. A step's loss and gradient norm stay device tensors; at the log line
    `sums` stacks them (with the token counts) into one tensor that the caller all-reduces, and `records`
    turns the reduced sums into metrics lines: one collective and one transfer per interval, the only host
    sync, so the device is never waited on per step. Step time and tokens/s are the interval's averages:
    without a sync per step, the host's clock per step would measure how far it ran ahead, not the step."""

    def __init__(self, device: torch.device, groups: int):
        self.device, self.groups = device, groups  # data-parallel groups: an sp group's loss shares add up
        self.steps: list[dict] = []
        self.t0 = time.perf_counter()

    def add(self, step: int, loss, grad_norm, tokens: int, flops: float, data_wait: float,
            memory: dict) -> None:
        self.steps.append({"step": step, "loss": loss, "grad_norm": grad_norm, "tokens": tokens,
                           "flops": flops, "data_wait_s": data_wait, "memory": memory})

    def sums(self, timed_out: bool) -> torch.Tensor:
        """(steps + 1, 2) float64 on the device: each step's loss and tokens, then whether this rank timed
        out."""
        f64, dev = torch.float64, self.device
        rows = [torch.stack([p["loss"].to(f64), torch.tensor(float(p["tokens"]), dtype=f64, device=dev)])
                for p in self.steps]
        return torch.stack(rows + [torch.tensor([float(timed_out), 0.0], dtype=f64, device=dev)])

    def records(self, summed: torch.Tensor) -> tuple[list[dict], bool]:
        """The pending steps' records from `sums` summed over the ranks (losses averaged, tokens summed), and
        whether any rank timed out; the pending list empties and the interval's clock restarts."""
        n, summed = len(self.steps), summed.tolist()
        norms = [p["grad_norm"] for p in self.steps]  # global already (DeepSpeed reduces it)
        if any(isinstance(g, torch.Tensor) for g in norms):
            norms = torch.stack([torch.as_tensor(float("nan") if g is None else g, dtype=torch.float64,
                                                 device=self.device) for g in norms]).tolist()
            norms = [None if g != g else g for g in norms]
        step_time = (time.perf_counter() - self.t0) / n
        records = [{"step": p["step"], "loss": loss_sum / self.groups,
                    "grad_norm": float(norm) if norm is not None else None, "_global_tokens": int(tokens),
                    "tokens_per_s": tokens / step_time, "tokens_per_s_worker": p["tokens"] / step_time,
                    "_flops_per_token": p["flops"] / max(p["tokens"], 1), "step_time_s": step_time,
                    "data_wait_s": p["data_wait_s"], **p["memory"]}
                   for p, (loss_sum, tokens), norm in zip(self.steps, summed[:n], norms)]
        self.steps.clear()
        self.restart_clock()
        return records, summed[n][0] > 0

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()
