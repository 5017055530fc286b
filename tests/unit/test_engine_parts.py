"""Pure parts of the engine: the LR schedule, weight-decay groups, the generated DeepSpeed config,
retention."""

from __future__ import annotations

import pytest

from ctxtrain.checkpoint import retention
from ctxtrain.config import load_config
from ctxtrain.engine import ds_config, lr_at, param_groups
from ctxtrain.model import DecoderLM, EncoderDecoder, ModelConfig
from tests.conftest import CONFIGS


def test_schedule_warmup_then_cosine_to_min():
    o = load_config(None, ["--optim.lr=1e-3", "--optim.min_lr=1e-4", "--optim.warmup_steps=10"]).optim
    assert lr_at(1, o, 110) == pytest.approx(1e-4)
    assert lr_at(10, o, 110) == pytest.approx(1e-3)
    assert lr_at(60, o, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cosine at pi/2
    assert lr_at(110, o, 110) == pytest.approx(1e-4)
    assert lr_at(500, o, 110) == pytest.approx(1e-4)  # past the end it stays at min_lr
    lrs = [lr_at(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_linear_and_constant():
    lin = load_config(None, ["--optim.decay=linear", "--optim.warmup_steps=0", "--optim.lr=1.0",
                             "--optim.min_lr=0"]).optim
    assert lr_at(50, lin, 100) == pytest.approx(0.5)
    const = load_config(None, ["--optim.decay=constant", "--optim.warmup_steps=4"]).optim
    assert lr_at(2, const, 100) == pytest.approx(const.lr / 2) and lr_at(99, const, 100) == const.lr


def test_no_weight_decay_on_norms_and_biases():
    for model in (DecoderLM(ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=48, n_layers=2)),
                  EncoderDecoder(ModelConfig(kind="encdec", vocab_size=64, d_model=32, n_heads=4, d_ff=48,
                                             n_layers=1,
                                             bias=True, norm="layernorm", mlp="gelu", pos="sinusoidal"))):
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert all(("norm" in names[id(p)] or names[id(p)].endswith("bias")) for p in no_decay["params"])
        assert all(p.ndim == 2 for p in decay["params"])
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_ds_config_follows_the_typed_config():
    cfg = load_config(CONFIGS / "lm_tiny.yaml", ["--zero.stage=3", "--zero.offload_optimizer=true",
                                                 "--zero.offload_params=true", "--train.grad_accum=4",
                                                 "--train.dtype=bf16", "--optim.grad_clip=0.5"])
    ds = ds_config(cfg, world_size=8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["train_batch_size"] == cfg.data.batch_size * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_ds_config_waits_on_the_device_nowhere_and_fits_the_device(device):
    """No per-step synchronizing feature of DeepSpeed is on: the throughput timer (it synchronizes the device
    twice per micro-batch) and bf16's gradient-overflow check (an all-reduce and a host read per step). bf16
    without ZeRO runs DeepSpeed's ZeRO-1 (its stage-0 bf16 wrapper checks every parameter on the host);
    bf16 accumulates in fp32 across micro-batches; overlap_comm and pinned offload buffers follow the
    device."""
    def ds(*overrides):
        return ds_config(load_config(CONFIGS / "lm_tiny.yaml", ["--train.dtype=bf16", *overrides]), 2, device)

    plain = ds("--zero.stage=0")
    assert plain["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert plain["wall_clock_breakdown"] is False
    assert plain["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert plain["zero_optimization"]["stage"] == 1 and "data_types" not in plain
    assert ds("--zero.stage=2", "--train.grad_accum=4")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds("--zero.stage=2")["zero_optimization"]["overlap_comm"] is (device == "cuda")
    assert ds("--zero.stage=2", "--zero.overlap_comm=false")["zero_optimization"]["overlap_comm"] is False
    offload = ds("--zero.stage=3", "--zero.offload_optimizer=true")["zero_optimization"]["offload_optimizer"]
    assert offload["pin_memory"] is (device == "cuda")
    fp32 = ds_config(load_config(CONFIGS / "lm_tiny.yaml", ["--train.dtype=fp32", "--zero.stage=0"]), 2,
                     device)
    assert fp32["zero_optimization"]["stage"] == 0 and fp32["bf16"] == {"enabled": False}


def test_gpus_per_worker_is_zero_or_one():
    from ctxtrain.config import ConfigError

    for value in ("0", "1", "null"):
        load_config(CONFIGS / "lm_tiny.yaml", [f"--cluster.gpus_per_worker={value}"])
    with pytest.raises(ConfigError, match="NCCL refuses two ranks on one GPU"):
        load_config(CONFIGS / "lm_tiny.yaml", ["--cluster.gpus_per_worker=0.5"])


def test_retention_keeps_last_and_every_mth():
    steps = [5, 10, 15, 20, 25, 30]
    assert retention(steps, keep_last=2, keep_every=0) == [5, 10, 15, 20]
    assert retention(steps, keep_last=2, keep_every=10) == [5, 15]
    assert retention([5], keep_last=3, keep_every=0) == []


def test_checkpoints_read_an_enum_member_pickled_as_getattr_and_no_other_getattr(tmp_path):
    """Python 3.11.2 pickles DeepSpeed's ZeroStageEnum members as getattr(ZeroStageEnum, name): weights-only
    loading reads them (every resume failed on it), and refuses any other getattr a file asks for."""
    import pickle
    import types

    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from ctxtrain.engine.core import weights_only_loading

    class Marker:
        pass

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, ZeroStageEnum):
                return getattr, (ZeroStageEnum, obj.name)
            if isinstance(obj, Marker):
                return getattr, (ZeroStageEnum, "__dict__")
            return NotImplemented

    as_311 = types.ModuleType("pickle_as_311")
    as_311.Pickler = Pickler
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "w": torch.ones(2)}, good, pickle_module=as_311)
    torch.save({"zero_stage": Marker()}, bad, pickle_module=as_311)
    assert b"getattr" in good.read_bytes()
    with weights_only_loading():
        loaded = torch.load(good, weights_only=False)  # as DeepSpeed calls it
        assert loaded["zero_stage"] is ZeroStageEnum.weights and loaded["w"].tolist() == [1.0, 1.0]
        with pytest.raises(pickle.UnpicklingError, match="getattr"):
            torch.load(bad, weights_only=False)
