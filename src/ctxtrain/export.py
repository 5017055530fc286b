"""A run's checkpoint as one set of weights: consolidation of the ZeRO shards (for `translate`, `generate`,
`eval`) and `ctxtrain export`'s folders.

    ctxtrain export runs/lm_tiny --out runs/lm_tiny/export [--step N]

OUT/model.safetensors + OUT/config.json (+ tokenizer.json) are ctxtrain's own; for a Llama-shaped LM OUT/hf/
is a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads with the engine's
logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from ctxtrain.checkpoint import committed_steps, open_storage, tag_of, verify
from ctxtrain.config import Config
from ctxtrain.data.dataset import Dataset, data_location
from ctxtrain.errors import UserError
from ctxtrain.rundir import RunDir, write_atomic


def resolve_export_checkpoint(run_dir: Path, step: Optional[int]) -> tuple[Config, object, str]:
    """(the run's config, its checkpoint storage, the tag) of the committed checkpoint to export: the newest,
    or --step, wherever the run stored its checkpoints (checkpoint.storage), verified against its manifest; a
    damaged one is refused in one line that names the previous sound one."""
    from ctxtrain.config import load_config

    run = RunDir(run_dir)
    if not run_dir.is_dir() or not run.is_run():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass the train.run_dir of a run")
    cfg = load_config(run.config, resolve=False)  # the run holds its model; its init_from folder may be gone
    cfg.train.run_dir = str(run_dir)  # the directory as given (the run may have been moved)
    storage = open_storage(cfg)
    steps = committed_steps(storage)
    if not steps:
        raise UserError(f"{storage.describe('')} holds no committed checkpoint; train until one is written "
                        "(checkpoint.every)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"--step {step}: no committed checkpoint; committed steps: "
                        f"{', '.join(map(str, steps))}")
    reason = verify(storage, tag_of(step))
    if reason:
        older = next((s for s in reversed(steps) if s < step and verify(storage, tag_of(s)) is None), None)
        hint = (f"export the previous sound one with --step {older}" if older
                else "no older committed one is sound")
        raise UserError(f"checkpoint {storage.describe(tag_of(step))} is damaged ({reason}); {hint}")
    return cfg, storage, tag_of(step)


def consolidated(run_dir: Path, step: Optional[int] = None) -> tuple[Config, dict, dict]:
    """(config, meta.json, fp32 weights) of a run's committed checkpoint (the newest, or `step`), verified,
    read from wherever the run stored it (a URI's files are staged for the consolidation and dropped
    again)."""
    from ctxtrain.engine import consolidate

    cfg, storage, tag = resolve_export_checkpoint(run_dir, step)
    meta = storage.read_meta(tag)
    storage.fetch(tag, 0, every_rank=True)  # a URI storage: every rank's shard into the local staging
    try:
        state = consolidate(str(storage.local_root / tag))
    finally:
        storage.drop_staged(tag)
    return cfg, meta, state


def export(run_dir: str | Path, out: str | Path, step: Optional[int] = None, progress: bool = True) -> Path:
    """Consolidate a committed checkpoint into OUT/model.safetensors + OUT/config.json (ctxtrain), and for a
    Llama-shaped LM also OUT/hf/ (config.json, model.safetensors, tokenizer.json) for transformers."""
    from safetensors.torch import save_file

    from ctxtrain.model.hf import check_llama_shaped, hf_config, to_hf_state_dict
    from ctxtrain.progress import bar as progress_bar

    run_dir, out = Path(run_dir), Path(out)
    bar = progress_bar(3, "export", "part", enabled=progress)
    cfg, meta, state = consolidated(run_dir, step)
    bar.update()
    if cfg.model.tie_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors stores a tensor once
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "step": str(meta["step"])})
    try:
        ds = Dataset(data_location(cfg.data.path), cfg.data.cache)
        special, tokenizer = ds.special, ds.tokenizer_path
    except UserError:  # the run's data is not here (or its store not reachable): no special ids, no tokenizer
        special, tokenizer = None, None
    write_atomic(out / "config.json", json.dumps({"ctxtrain_model": cfg.to_dict()["model"],
                                                  "step": meta["step"],
                                                  "tokens": meta["tokens"],
                                                  "data": {"special": special,
                                                           "max_src_len": cfg.data.max_src_len,
                                                           "max_tgt_len": cfg.data.max_tgt_len}},
                                                 indent=1) + "\n")
    if tokenizer is not None and tokenizer.is_file():  # `ctxtrain translate/generate` read it from the export
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    bar.update()
    try:
        check_llama_shaped(cfg.model)
        llama = True
    except ValueError:
        llama = False
    if llama:
        hf = out / "hf"
        hf.mkdir(exist_ok=True)
        full = dict(state)
        if cfg.model.tie_embeddings:
            full["lm_head.weight"] = full["tok_embed.weight"]
        hf_state = {k: v.contiguous() for k, v in to_hf_state_dict(full, cfg.model).items()}
        save_file(hf_state, str(hf / "model.safetensors"), metadata={"format": "pt"})
        write_atomic(hf / "config.json", json.dumps(hf_config(cfg.model), indent=1) + "\n")
        if tokenizer is not None and tokenizer.is_file():
            shutil.copyfile(tokenizer, hf / "tokenizer.json")
        source = Path(cfg.model.init_from) if cfg.model.init_from else None
        for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            # the pretrained folder's special ids travel on
            if source is not None and (source / name).is_file():
                shutil.copyfile(source / name, hf / name)
    bar.update()
    bar.close()
    return out
