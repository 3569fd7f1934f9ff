"""Training checkpoints without pickle: a restored state continues exactly like the original."""

import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from sane_hf.pretraining.checkpointing import (
    flatten_optimizer_state,
    load_training_state,
    save_training_state,
    unflatten_optimizer_state,
)
from sane_hf.pretraining.loop import one_cycle_schedule


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state()
    GradientState._reset_state()


def training_setup(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1)
    )
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() == 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    scheduler = one_cycle_schedule(optimizer, total_steps=10, warmup_fraction=0.3)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    """One step whose result depends on the weights, the optimizer, the schedule and every RNG
    (dropout draws from torch's; the inputs from Python's and NumPy's)."""
    inputs = torch.randn(16, 4) + random.random() + float(np.random.rand())
    model(inputs).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_restored_training_state_continues_exactly(accelerator, tmp_path):
    model, optimizer, scheduler = training_setup(accelerator)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    save_training_state(tmp_path, accelerator, model, optimizer, scheduler, {"step": 3})
    expected = [train_step(model, optimizer, scheduler) for _ in range(2)]

    # a fresh run, with other RNG states
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    model, optimizer, scheduler = training_setup(accelerator)
    assert load_training_state(tmp_path, accelerator, model, optimizer, scheduler) == {"step": 3}
    assert scheduler.last_epoch == 3
    for weights in expected:
        assert torch.equal(train_step(model, optimizer, scheduler), weights)
    assert {path.suffix for path in tmp_path.iterdir()} == {".safetensors", ".json"}


def test_resuming_with_another_number_of_processes_is_a_clear_error(accelerator, tmp_path):
    model, optimizer, scheduler = training_setup(accelerator)
    save_training_state(tmp_path, accelerator, model, optimizer, scheduler, {"step": 0})
    (tmp_path / "rng_state_0.safetensors").rename(tmp_path / "rng_state_1.safetensors")
    with pytest.raises(FileNotFoundError, match=r"RNG state of process 0.*number of processes"):
        load_training_state(tmp_path, accelerator, model, optimizer, scheduler)


def test_optimizer_state_flattens_to_named_tensors_and_back():
    state_dict = {
        "state": {
            "encoder.layers.0.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)},
            "head.bias": {"step": torch.tensor(3.0), "momentum_buffer": None},
        },
        "param_groups": [{"lr": 0.1, "params": ["encoder.layers.0.weight", "head.bias"]}],
    }
    tensors, data = flatten_optimizer_state(state_dict)
    assert sorted(tensors) == [
        "encoder.layers.0.weight.exp_avg",
        "encoder.layers.0.weight.step",
        "head.bias.step",
    ]
    assert data["state"] == {"head.bias": {"momentum_buffer": None}}
    restored = unflatten_optimizer_state(tensors, data)
    assert restored["param_groups"] == state_dict["param_groups"]
    assert restored["state"].keys() == state_dict["state"].keys()
    assert torch.equal(restored["state"]["encoder.layers.0.weight"]["exp_avg"], torch.ones(2))
    assert torch.equal(restored["state"]["head.bias"]["step"], torch.tensor(3.0))
    assert restored["state"]["head.bias"]["momentum_buffer"] is None
