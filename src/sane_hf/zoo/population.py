"""The population trainer behind `train_zoo` and `fine_tune_population`: one chunk of models of one
module structure trained with one vectorized step.

Parameters of the chunk's models are stacked into ``[M, ...]`` tensors and one training step is
``vmap(grad(loss))`` over ``torch.func.functional_call`` (or, on CPU, one step of
`sane_hf.zoo.grouped.GroupedSequential`): every model gets its own batch (its own data order,
`data_order`), its own dropout masks and its own BatchNorm statistics. `PopulationOptimizer`
applies Adam/AdamW/SGD to the stacked tensors with a learning rate and weight decay per model.
`ChunkTrainer` saves its stacked state at every checkpoint epoch, so a killed chunk resumes
bit-exactly on CPU.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from sane_hf.zoo.architectures import build_model, initialize
from sane_hf.zoo.config import ModelSpec, ZooConfig
from sane_hf.zoo.formats import atomic_save_safetensors, atomic_write_text, write_checkpoint
from sane_hf.zoo.grouped import GroupedSequential
from sane_hf.zoo.tasks import ImageDataset

# (model, sample) pairs per evaluation forward when eval_batch_size is None: on CPU, activations
# beyond ~1k pairs fall out of cache and throughput drops by a third; GPUs want large batches.
_EVAL_PAIRS = {"cpu": 1024, "cuda": 262144}


def data_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The order in which the zoo model with ``seed`` visits the training samples in ``epoch``.

    Derived from ``(seed, epoch)`` alone, so it does not depend on which models share a chunk and
    a plain training loop can replay a zoo model exactly.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def structural_kwargs(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters that change the module (dropout is passed only when non-zero, since
    dropout 0 is every architecture's default and ResNets take no dropout argument)."""
    kwargs = {"activation": hyperparameters["activation"]}
    if hyperparameters["dropout"]:
        kwargs["dropout"] = hyperparameters["dropout"]
    return kwargs


def initialize_zoo_model(
    architecture: str,
    architecture_kwargs: dict[str, Any],
    hyperparameters: dict[str, Any],
    seed: int,
) -> nn.Module:
    """Build and initialize one zoo model exactly as ``train_zoo`` does (for replays and checks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(
            architecture, **architecture_kwargs, **structural_kwargs(hyperparameters)
        )
        return initialize(model, hyperparameters["init"])


def steps_per_epoch(dataset: ImageDataset, batch_size: int) -> int:
    return math.ceil(len(dataset.train[1]) / batch_size)


class PopulationOptimizer:
    """Adam, AdamW or SGD with momentum on stacked parameters ``[M, ...]``, updated in place.

    Follows ``torch.optim``'s update rules (L2 weight decay added to the gradient for adam/sgd,
    decoupled decay for adamw) with a learning rate and a weight decay per model.
    """

    def __init__(self, config: ZooConfig, specs: list[ModelSpec], params: dict[str, Tensor]):
        device = next(iter(params.values())).device
        self.name = specs[0].hyperparameters["optimizer"]
        self.lr = torch.tensor([s.hyperparameters["lr"] for s in specs], device=device)
        self.weight_decay = torch.tensor(
            [s.hyperparameters["weight_decay"] for s in specs], device=device
        )
        self.beta1, self.beta2 = config.adam_betas
        self.eps = config.adam_eps
        self.momentum = config.sgd_momentum
        self.steps = 0
        slots = ("momentum",) if self.name == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state = {
            f"{slot}.{k}": torch.zeros_like(p) for slot in slots for k, p in params.items()
        }

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        self.steps += 1
        for key, param in params.items():
            shape = (-1,) + (1,) * (param.dim() - 1)
            lr, weight_decay = self.lr.view(shape), self.weight_decay.view(shape)
            update = self._sgd if self.name == "sgd" else self._adam
            update(key, param, grads[key], lr, weight_decay)

    def _sgd(self, key: str, param: Tensor, grad: Tensor, lr: Tensor, weight_decay: Tensor) -> None:
        grad = grad + weight_decay * param
        if self.momentum:
            grad = self.state[f"momentum.{key}"].mul_(self.momentum).add_(grad)
        param.sub_(lr * grad)

    def _adam(
        self, key: str, param: Tensor, grad: Tensor, lr: Tensor, weight_decay: Tensor
    ) -> None:
        if self.name == "adamw":
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
        exp_avg, exp_avg_sq = self.state[f"exp_avg.{key}"], self.state[f"exp_avg_sq.{key}"]
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1**self.steps
        bias_correction2_sqrt = math.sqrt(1 - self.beta2**self.steps)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param.sub_((lr / bias_correction1) * exp_avg / denom)


class ChunkTrainer:
    """Trains one chunk of models with one vectorized step, checkpointing as it goes."""

    def __init__(
        self,
        config: ZooConfig,
        architecture_kwargs: dict[str, Any],
        specs: list[ModelSpec],
        data: ImageDataset,
        device: torch.device,
        models: list[nn.Module] | None = None,
    ):
        """``models`` (one per spec, all of one structure) start the training instead of the
        specs' own initializations (fine-tuning sampled networks)."""
        self.config, self.specs, self.data, self.device = config, specs, data, device
        # oneDNN's grouped convolutions (what vmap turns a batched conv into) run ~1.4x faster on
        # channels-last tensors; GPUs keep PyTorch's default layout.
        self.channels_last = device.type == "cpu"
        if models is None:
            models = [
                initialize_zoo_model(
                    config.architecture, architecture_kwargs, s.hyperparameters, s.seed
                )
                for s in specs
            ]
        # A parameter-less template: every tensor comes from the stacked dicts below.
        self.module = copy.deepcopy(models[0]).to("meta")
        params = _stack([dict(m.named_parameters()) for m in models], device)
        self.params = {k: self._weight_layout(v) for k, v in params.items()}
        self.buffers = _stack([dict(m.named_buffers()) for m in models], device)
        self.eval_splits = self._eval_splits()
        self.state_keys = list(models[0].state_dict())
        self.optimizer = PopulationOptimizer(config, specs, self.params)
        self.epoch = 0
        self.records: list[dict] = []
        self._vmap_logits = vmap(self._forward, in_dims=(0, 0, None))
        self.grouped = self._grouped_network()
        if self.grouped is None:
            self._train_step = vmap(grad(self._loss), randomness="different")
        else:
            self._train_step = grad(self._grouped_loss)

    def _grouped_network(self) -> GroupedSequential | None:
        """The grouped fast path, on CPU (where vmap's layout copies dominate a step), for
        networks it supports and whose logits it reproduces (checked on two samples)."""
        if self.device.type != "cpu" or not GroupedSequential.supports(self.module):
            return None
        grouped = GroupedSequential(self.module, len(self.specs))
        x = self.data.train[0][:2]
        self.module.eval()
        with torch.no_grad():
            expected = self._vmap_logits(self.params, self.buffers, x)
            try:
                logits = grouped.shared_inputs(self.params, x)
            except (RuntimeError, ValueError):
                return None
        return grouped if torch.allclose(logits, expected, rtol=1e-4, atol=1e-6) else None

    def _forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.module, (params, buffers), (x,))

    def _loss(self, params, buffers, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self._forward(params, buffers, x).float(), y)

    def _grouped_loss(self, params, buffers, x: Tensor, y: Tensor) -> Tensor:
        """Sum over models of each model's mean loss: its gradient is every model's own."""
        logits = self.grouped(params, x).float()  # [B, M, classes]
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0).sum()

    def _logits(self, params, buffers, x: Tensor) -> Tensor:
        """Logits ``[M, B, classes]`` of every model on the same inputs ``x``."""
        if self.grouped is None:
            return self._vmap_logits(params, buffers, x)
        return self.grouped.shared_inputs(params, x)

    def _train_batch(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and labels of the training samples ``batch`` ``[M, B]`` in the step's layout."""
        x, y = self.data.train
        if self.grouped is not None:
            batch = batch.t()
            return GroupedSequential.inputs(x[batch]), y[batch]
        return self._batch_layout(x[batch]), y[batch]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _weight_layout(self, tensor: Tensor) -> Tensor:
        """Store stacked conv weights ``[M, O, C, kh, kw]`` as ``[M, O, kh, kw, C]``: merged into
        ``[M*O, C, kh, kw]`` for a grouped convolution they are channels-last."""
        if not (self.channels_last and tensor.dim() == 5):
            return tensor
        return tensor.movedim(2, -1).contiguous().movedim(-1, 2)

    def _batch_layout(self, batch: Tensor) -> Tensor:
        """Store image batches ``[M, B, C, H, W]`` as ``[B, H, W, M, C]``: merged into
        ``[B, M*C, H, W]`` by vmap's grouped convolution they are channels-last."""
        if not (self.channels_last and batch.dim() == 5):
            return batch
        return batch.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)

    def _eval_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        if not self.channels_last:
            return self.data.splits()
        return {
            name: (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, y)
            for name, (x, y) in self.data.splits().items()
        }

    def run(self, output_dir: Path, state_path: Path, bar: tqdm) -> list[dict]:
        """Train to ``config.epochs`` (resuming from ``state_path`` if saved); return the records."""
        if self._load_state(state_path):
            bar.update(self.epoch * steps_per_epoch(self.data, self.config.batch_size))
        else:
            self._checkpoint(output_dir, state_path)  # epoch 0: the initialization
        while self.epoch < self.config.epochs:
            self.epoch += 1
            self._train_epoch(bar)
            if self.epoch in self.config.resolved_checkpoint_epochs:
                self._checkpoint(output_dir, state_path)
        return self.records

    def _train_epoch(self, bar: tqdm) -> None:
        y = self.data.train[1]
        # Dropout masks come from the global generator, seeded per chunk and epoch for resumption.
        torch.manual_seed(
            int(np.random.SeedSequence([self.specs[0].seed, self.epoch]).generate_state(1)[0])
        )
        orders = np.stack([data_order(s.seed, self.epoch, len(y)) for s in self.specs])
        orders = torch.from_numpy(orders).to(self.device)
        self.module.train()
        for batch in orders.split(self.config.batch_size, dim=1):
            with self._autocast():
                grads = self._train_step(self.params, self.buffers, *self._train_batch(batch))
            self.optimizer.step(self.params, grads)
            bar.update(1)

    @torch.no_grad()
    def evaluate(self, splits: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Loss and accuracy of every model on ``splits`` (default: all):
        ``{"train_loss": [M], ...}``."""
        self.module.eval()
        batch_size = self.config.eval_batch_size or max(
            1, _EVAL_PAIRS.get(self.device.type, _EVAL_PAIRS["cuda"]) // len(self.specs)
        )
        metrics = {}
        for split, (x, y) in self.eval_splits.items():
            if splits is not None and split not in splits:
                continue
            loss_sum = torch.zeros(len(self.specs), device=self.device)
            correct = torch.zeros(len(self.specs), device=self.device)
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                with self._autocast():
                    logits = self._logits(self.params, self.buffers, xb).float()  # [M, b, classes]
                target = yb.expand(len(self.specs), -1)
                loss_sum += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
                correct += (logits.argmax(-1) == target).sum(1)
            metrics[f"{split}_loss"] = loss_sum.cpu().double() / len(y)
            metrics[f"{split}_acc"] = correct.cpu().double() / len(y)
        return metrics

    def _checkpoint(self, output_dir: Path, state_path: Path) -> None:
        metrics = {k: v.tolist() for k, v in self.evaluate().items()}
        tensors = {k: v.cpu() for k, v in {**self.params, **self.buffers}.items()}
        for i, spec in enumerate(self.specs):
            state_dict = {k: tensors[k][i] for k in self.state_keys}
            file = write_checkpoint(output_dir, spec.model_id, self.epoch, state_dict)
            record = {
                "file": file,
                "model_id": spec.model_id,
                "epoch": self.epoch,
                "seed": spec.seed,
            }
            record.update({name: values[i] for name, values in metrics.items()})
            record["ggap"] = record["train_acc"] - record["test_acc"]
            record["hyperparameters"] = spec.hyperparameters
            self.records.append(record)
        self._save_state(state_path)

    def _save_state(self, state_path: Path) -> None:
        """Save the chunk's training state; the JSON names the tensor file, so it commits last."""
        tensors = {f"param.{k}": v for k, v in self.params.items()}
        tensors |= {f"buffer.{k}": v for k, v in self.buffers.items()}
        tensors |= {f"optimizer.{k}": v for k, v in self.optimizer.state.items()}
        tensor_file = state_path.with_name(f"{state_path.name}_epoch_{self.epoch:03d}.safetensors")
        atomic_save_safetensors({k: v.cpu() for k, v in tensors.items()}, tensor_file)
        state = {
            "tensors": tensor_file.name,
            "epoch": self.epoch,
            "optimizer_steps": self.optimizer.steps,
            "model_ids": [s.model_id for s in self.specs],
            "records": self.records,
        }
        atomic_write_text(state_json(state_path), json.dumps(state))
        for old in state_path.parent.glob(f"{state_path.name}_epoch_*.safetensors"):
            if old != tensor_file:
                old.unlink()

    def _load_state(self, state_path: Path) -> bool:
        """Restore a saved state of this chunk; False if there is none (or it is of other models)."""
        if not state_json(state_path).exists():
            return False
        state = json.loads(state_json(state_path).read_text())
        if state["model_ids"] != [s.model_id for s in self.specs]:
            return False
        tensors = load_file(state_path.parent / state["tensors"], device=str(self.device))
        for prefix, target in [
            ("param.", self.params),
            ("buffer.", self.buffers),
            ("optimizer.", self.optimizer.state),
        ]:
            for key in target:
                target[key] = self._weight_layout(tensors[prefix + key])
        self.epoch = state["epoch"]
        self.optimizer.steps = state["optimizer_steps"]
        self.records = state["records"]
        return True


def _stack(tensor_dicts: list[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
    return {
        k: torch.stack([d[k].detach() for d in tensor_dicts]).to(device) for k in tensor_dicts[0]
    }


def state_json(state_path: Path) -> Path:
    """The JSON file of a chunk's saved training state (it names the tensor file)."""
    return state_path.with_suffix(".json")
