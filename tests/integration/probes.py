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


TARGET_LENGTHS = [[2, 3], [17, 9], [5, 4], [30, 21]]  # rank r's micro-batches: TARGET_LENGTHS[2r], [2r + 1]


def pair_batch(lengths: list[int], seed: int) -> dict:
    """A translation micro-batch: pairs with targets of the given lengths (random ids, a fixed seed)."""
    import numpy as np

    from ctxtrain.data.loader import collate_pairs, to_torch

    rng = np.random.default_rng(seed)
    pairs = [(rng.integers(4, 200, 7), rng.integers(4, 200, n)) for n in lengths]
    return to_torch(collate_pairs(pairs, np.arange(len(pairs)), {"pad": 0, "bos": 1, "eos": 2}, 64, 64))


TOKENS_PER_STEP = 100.0


def token_weighted_steps(cfg) -> None:
    """Two optimizer steps at learning rate 0 of two translation micro-batches of different lengths on each
    rank, the first without tokens_per_step, the second with TOKENS_PER_STEP; rank 0 saves the gradient norms
    the engine reports."""
    import json

    info = init_distributed(cfg)
    try:
        torch.manual_seed(0)
        engine = Engine(cfg, build_model(cfg.model), info)
        batches = [pair_batch(TARGET_LENGTHS[2 * info.rank + k], 2 * info.rank + k) for k in range(2)]
        norms = [float(engine.train_step(batches, 0.0)[1])]
        engine.tokens_per_step = TOKENS_PER_STEP
        norms.append(float(engine.train_step(batches, 0.0)[1]))
        if info.rank == 0:
            (Path(cfg.train.run_dir) / "grad_norms.json").write_text(json.dumps(norms))
    finally:
        shutdown(info)
