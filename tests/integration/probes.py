"""Worker entry points for tests, run by the real local launcher in every worker process
(`ctxtrain.local_launch.launch(cfg, entry="tests.integration.probes:...")`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ctxtrain import checkpoint as ckpt
from ctxtrain.engine import Engine, init_distributed, shutdown
from ctxtrain.model import build_model

PROBE_TOKENS = torch.arange(64).reshape(2, 32) * 97 % 8000


def engine_logits(cfg) -> None:
    """Restore the newest committed checkpoint into a fresh ZeRO engine and save its logits on fixed tokens
    (the run directory's probe_tokens.pt when a test put one there)."""
    info = init_distributed(cfg)
    try:
        torch.manual_seed(0)
        engine = Engine(cfg, build_model(cfg.model), info)
        storage = ckpt.open_storage(cfg)
        target = ckpt.resume_target(cfg, storage)
        ckpt.load(engine, target, cfg)
        engine.ds.eval()
        given = Path(cfg.train.run_dir) / "probe_tokens.pt"
        tokens = torch.load(given) if given.is_file() else PROBE_TOKENS
        with torch.no_grad():
            logits = engine.ds(tokens.to(info.device))
        if info.rank == 0:
            torch.save({"tag": target.tag, "logits": logits.float().cpu()},
                       Path(cfg.train.run_dir) / "probe_logits.pt")
    finally:
        shutdown(info)


def engine_settings(cfg) -> None:
    """Build the engine that `ctxtrain train` builds for this config and record what DeepSpeed made of it: the
    optimizer wrapper, the throughput timer, bf16's overflow check and the accumulation dtype."""
    import json

    info = init_distributed(cfg)
    try:
        torch.manual_seed(0)
        engine = Engine(cfg, build_model(cfg.model), info)
        timer = engine.ds.tput_timer.config
        settings = {"optimizer": type(engine.ds.optimizer).__name__,
                    "throughput_timer": {"enabled": timer.enabled, "synchronized": timer.synchronized},
                    "check_grad_overflow": engine.ds._config.bfloat16_config.check_grad_overflow,
                    "grad_accum_dtype": str(engine.ds.get_data_types()[1])}
        if info.rank == 0:
            (Path(cfg.train.run_dir) / "engine_settings.json").write_text(json.dumps(settings))
    finally:
        shutdown(info)
