"""Speed of one SANE pretraining step: two views through encoder, decoder and projection head,
the combined loss (NT-Xent + masked MSE), backward and an AdamW update.

Synthetic tokens of the preset's shapes (the values do not affect speed). Reference on an H100,
its own code with fp16 autocast and a grad scaler (docs/sane-method.md, section 7): CNN preset
(T=289, window 64, batch 32, 4,096 tokens/step) 61.2 ms, 5.0 GiB; ResNet-18 preset (T=288,
window 256, batch 32, 16,384 tokens/step) 210 ms, 32.8 GiB. Targets: 20 ms and 150 ms.

The step is the lean one: both views in one batch, bf16 autocast over float32 weights and
optimizer states (bf16 has float32's range: no grad scaler), fused AdamW, no host
synchronization anywhere in the step (position range checks off, as in pretraining, which checks
the zoo once; losses stay on the device until the end). On CPU, ``--dtype bf16`` runs the
projections as bf16 (AMX) matmuls and attention in float32 (`SaneAttention`). Options:

- ``--compile blocks`` compiles every transformer block in place (``nn.Module.compile``: the
  model's own forward calls the compiled blocks); ``--compile model`` compiles the whole forward
  with the losses. The result reports how many graphs dynamo compiled and how many graph breaks
  it hit, to show the compiled path is the one that runs.
- ``--cuda-graph`` captures the whole step (forward, backward, AdamW with ``capturable=True``)
  in one CUDA graph and replays it, copying each batch into the graph's input buffers first:
  for the small CNN step, where launching ~2,000 kernels costs as much as running them.
- The SDPA backend is reported as the attention kernel the model really ran (profiled), and on
  CUDA whether the flash kernel accepts these shapes (``sdpa_kernel([FLASH_ATTENTION])``).

Counting: a step processes ``2 * batch * window`` tokens (both views; the reference counts the
same way). Model FLOPs = 6 * N * tokens with N the parameters outside the position tables
(lookups are not matmuls); attention-score matmuls are not counted. On CUDA, steps are timed with
events and no host synchronization between them. Peak memory is ``max_memory_allocated`` on GPU
and the process' peak RSS on CPU.

    python -m benchmarks.speed.bench_train_step --preset tiny
    OMP_NUM_THREADS=1 python -m benchmarks.speed.bench_train_step --preset cpu --threads 1
    OMP_NUM_THREADS=1 python -m benchmarks.speed.bench_train_step --preset cpu --threads 1 \
        --dtype bf16 --attn eager --compile model
    python -m benchmarks.speed.bench_train_step --preset cnn --compile model --cuda-graph
    python -m benchmarks.speed.bench_train_step --preset resnet18 --compile model

On CUDA the result also holds a kernel profile of three steps (`common.kernel_profile`): GPU
time by category (matmul, attention, optimizer, copies, the rest), the GPU-busy fraction of the
wall time and the top kernels.

Prints JSON and writes ``benchmarks/results/bench_train_step_<preset>[_<tag>].json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import nullcontext

import torch

from benchmarks.common import (
    CPU_PRETRAINING,
    DTYPES,
    cpu_time_repeats,
    default_device,
    kernel_profile,
    machine_info,
    peak_memory,
    reset_peak_memory,
    summarize_ms,
    synchronize,
    time_repeats,
    write_results,
)
from sane_hf import SaneConfig, SaneModel
from sane_hf.models.sane.modeling_sane import SaneLayer

DEFAULT_BATCH_SIZE = {"tiny": 4, "cpu": 32, "cnn": 32, "resnet18": 32}
# Length of the synthetic token sequence windows are cut from: CNN-m and ResNet-18 (BN kept).
SEQUENCE_LENGTH = {"tiny": 93, "cpu": 93, "cnn": 93, "resnet18": 53_704}
# cnn, resnet18: the reference on an H100; cpu: the reference implementation on the 2-core
# CPU, one thread, fp32, run back to back with ours (103 ms then).
REFERENCE_STEP_MS = {"cpu": 112.0, "cnn": 61.2, "resnet18": 210.0}
TARGET_STEP_MS = {"cpu": 56.0, "cnn": 20.0, "resnet18": 150.0}
# ``cpu``: the cpu-scale SANE of the reproduction scripts (CPU_PRETRAINING: d_model 64, 4+4
# blocks, 4 heads, latent 128, window 48) at the CNN token size T=289.
BENCH_PRESETS = {"cpu": ("tiny", CPU_PRETRAINING["model"])}
# aten::_scaled_dot_product_{flash,efficient,cudnn}_attention, ..._attention_math
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")


def bench_config(preset: str) -> SaneConfig:
    """The SANE config a benchmark preset times: a model preset, or ``cpu`` (tiny widened to the
    cpu-scale shape of ``CPU_PRETRAINING``)."""
    base, overrides = BENCH_PRESETS.get(preset, (preset, {}))
    return SaneConfig.from_preset(base, **{k: v for k, v in overrides.items() if k != "preset"})


def synthetic_views(
    config: SaneConfig, batch_size: int, window: int, sequence_length: int, device: torch.device
) -> dict:
    """Two noisy views of `batch_size` random windows, with targets and padding of last chunks.

    Windows are cut from inside the sequence, so no token is padding and there is no attention
    mask (as in pretraining on zoos whose sequences are longer than the window).
    """
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(batch_size, window, config.tokensize, generator=generator)
    value_mask = torch.ones_like(clean, dtype=torch.bool)
    value_mask[:, 1::2, config.tokensize // 2 :] = False  # every second token a padded last chunk
    clean = clean.masked_fill(~value_mask, 0.0)
    start = torch.randint(0, sequence_length - window + 1, (batch_size, 1), generator=generator)
    global_index = start + torch.arange(window)
    layer_index = (global_index * config.max_positions[1] // sequence_length).clamp_max(
        config.max_positions[1] - 1
    )
    row_index = global_index % min(64, config.max_positions[2])
    positions = torch.stack([global_index, layer_index, row_index], dim=-1)
    views = clean.repeat(2, 1, 1)
    noisy = views * (1 + 0.1 * torch.randn(views.shape, generator=generator))
    batch = {
        "tokens": noisy,
        "positions": positions.repeat(2, 1, 1),
        "target_tokens": views,
        "value_mask": value_mask.repeat(2, 1, 1),
    }
    return {name: tensor.to(device) for name, tensor in batch.items()}


def model_and_optimizer(
    config: SaneConfig,
    device: torch.device,
    attn: str = "sdpa",
    adamw: str = "fused",
    position_checks: bool = False,
    capturable: bool = False,
) -> tuple[SaneModel, torch.optim.Optimizer]:
    """A seeded SANE in training mode and the reference's AdamW (lr 1e-4, weight decay 3e-9)."""
    torch.manual_seed(0)
    model = SaneModel(config).to(device).train()
    model.set_attn_implementation(attn)
    model.set_position_checks(position_checks)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        weight_decay=3e-9,
        fused=adamw == "fused",
        foreach=adamw == "foreach",
        capturable=capturable,
    )
    return model, optimizer


def autocast_context(dtype_name: str, device: torch.device, cache_enabled: bool = True):
    """Autocast to ``dtype_name`` (``DTYPES``) on ``device``, or nothing for fp32."""
    if dtype_name == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype_name], cache_enabled=cache_enabled)


def compile_model(model: SaneModel, how: str) -> Callable[..., object]:
    """The callable a step runs: the model itself, with compiled blocks, or compiled whole."""
    if how == "blocks":
        for module in model.modules():
            if isinstance(module, SaneLayer):
                module.compile()  # in place: the model's forward now calls the compiled block
        return model
    if how == "model":
        return torch.compile(model)
    return model


def dynamo_report() -> dict[str, int]:
    """Graphs dynamo compiled and graph breaks it hit so far (0 and 0 when nothing compiled)."""
    from torch._dynamo.utils import counters

    return {
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def sdpa_report(model: SaneModel, batch: dict, autocast) -> dict[str, object]:
    """Which SDPA kernel the model's attention really runs, and (CUDA) whether flash accepts it.

    The kernel is read off the profiler's op names (``aten::_scaled_dot_product_flash_attention``
    and so on) for one forward pass in the benchmark's dtype.
    """
    with torch.no_grad(), autocast, torch.profiler.profile() as profile:
        model(**batch)
    names = {event.name for event in profile.events() if "scaled_dot_product_" in event.name}
    selected = sorted({kernel for kernel in SDPA_KERNELS for name in names if kernel in name})
    report: dict[str, object] = {"sdpa_kernels_run": selected or sorted(names)}
    if batch["tokens"].is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        report["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
        try:
            with torch.no_grad(), autocast, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                model(**batch)
            report["flash_accepts_these_inputs"] = True
        except RuntimeError as error:
            report["flash_accepts_these_inputs"] = f"no: {str(error).splitlines()[0]}"
    return report


def make_train_step(
    forward: Callable[..., object], optimizer: torch.optim.Optimizer, batch: dict, autocast
) -> Callable[[], torch.Tensor]:
    """One step on ``batch``; returns the loss as a device tensor (no host synchronization)."""

    def train_step() -> torch.Tensor:
        with autocast:
            loss = forward(**batch, num_views=2).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return train_step


def capture_cuda_graph(
    forward: Callable[..., object],
    optimizer: torch.optim.Optimizer,
    batch: dict,
    autocast,
    warmup_steps: int,
) -> Callable[[], torch.Tensor]:
    """Capture one whole training step in a CUDA graph (PyTorch's "whole network capture").

    Returns a step function that copies ``batch`` into the graph's static inputs (what a training
    loop does with each new batch) and replays the graph.
    """
    static_batch = {name: tensor.clone() for name, tensor in batch.items()}
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):  # warm up (and compile) outside the default stream
        eager_step = make_train_step(forward, optimizer, static_batch, autocast)
        for _ in range(warmup_steps):
            eager_step()
    torch.cuda.current_stream().wait_stream(side_stream)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
    with torch.cuda.graph(graph):
        with autocast:
            static_loss = forward(**static_batch, num_views=2).loss
        static_loss.backward()
        optimizer.step()

    def graph_step() -> torch.Tensor:
        for name, tensor in batch.items():
            static_batch[name].copy_(tensor, non_blocking=True)
        graph.replay()
        return static_loss.detach().clone()

    return graph_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(DEFAULT_BATCH_SIZE), default="tiny")
    parser.add_argument("--batch-size", type=int, help="windows per view (default: 32, tiny: 4)")
    parser.add_argument("--window", type=int, help="tokens per window (default: the preset's)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="autocast dtype (default: bf16 on CUDA, else fp32)"
    )
    parser.add_argument("--attn", default="sdpa", help="eager, sdpa or flash_attention_2")
    parser.add_argument("--compile", choices=("none", "blocks", "model"), default="none")
    parser.add_argument("--cuda-graph", action="store_true", help="replay the step as a graph")
    parser.add_argument(
        "--adamw", choices=("fused", "foreach", "loop"), default="fused", help="AdamW kernel"
    )
    parser.add_argument(
        "--position-checks",
        action="store_true",
        help="keep the per-forward position range check (a host sync) on",
    )
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--tag", help="suffix of the result file name, to keep variants apart")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA device")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    config = bench_config(args.preset)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE[args.preset]
    window = args.window or config.windowsize
    model, optimizer = model_and_optimizer(
        config, device, args.attn, args.adamw, args.position_checks, capturable=args.cuda_graph
    )
    if args.activation_checkpointing:
        # transformers >= 5.23 name; older versions only have gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    num_parameters = model.num_parameters()
    matmul_parameters = num_parameters - sum(
        p.numel() for name, p in model.named_parameters() if name.startswith("position_embeddings.")
    )
    batch = synthetic_views(config, batch_size, window, SEQUENCE_LENGTH[args.preset], device)
    # cache_enabled=False: autocast's weight-cast cache must not outlive a captured graph
    autocast = autocast_context(dtype_name, device, cache_enabled=not args.cuda_graph)
    attention = sdpa_report(model, batch, autocast)

    forward = compile_model(model, args.compile)
    if args.cuda_graph:
        train_step = capture_cuda_graph(forward, optimizer, batch, autocast, args.warmup)
    else:
        train_step = make_train_step(forward, optimizer, batch, autocast)
        for _ in range(args.warmup):
            train_step()
    synchronize(device)
    compiled = dynamo_report()
    if args.compile != "none" and compiled["compiled_graphs"] == 0:
        raise RuntimeError(f"--compile {args.compile} ran, but dynamo compiled no graph")

    reset_peak_memory(device)
    losses: list[torch.Tensor] = []
    step_ms = time_repeats(lambda: losses.append(train_step()), args.steps, device)
    cpu_step_ms = cpu_time_repeats(train_step, args.steps) if device.type == "cpu" else None
    losses = torch.stack(losses).tolist()
    profile = kernel_profile(train_step, 3, device)

    tokens_per_step = 2 * batch_size * window
    median_s = summarize_ms(step_ms)["median_ms"] / 1e3
    results = {
        "benchmark": "SANE train step (2 views, forward + loss + backward + AdamW)",
        "preset": args.preset,
        "dtype": dtype_name if dtype_name == "fp32" else f"{dtype_name} autocast, fp32 weights",
        "attn_implementation": model.config._attn_implementation,
        **attention,
        "compile": args.compile,
        **compiled,
        "cuda_graph": args.cuda_graph,
        "adamw": args.adamw,
        "position_checks": args.position_checks,
        "activation_checkpointing": args.activation_checkpointing,
        "batch_size": batch_size,
        "window": window,
        "tokensize": config.tokensize,
        "tokens_per_step": tokens_per_step,
        "num_parameters": num_parameters,
        "matmul_parameters": matmul_parameters,
        "steps": args.steps,
        **{f"step_{key}": value for key, value in summarize_ms(step_ms).items()},
        **(
            {f"step_cpu_{k}": v for k, v in summarize_ms(cpu_step_ms).items()}
            if cpu_step_ms
            else {}
        ),
        "tokens_per_s": round(tokens_per_step / median_s),
        "model_tflops_per_s": round(6 * matmul_parameters * tokens_per_step / median_s / 1e12, 4),
        "flops_counting": "6 * matmul_parameters * tokens_per_step per step (no attention scores)",
        **peak_memory(device),
        **profile,
        "reference_step_ms": REFERENCE_STEP_MS.get(args.preset),
        "target_step_ms": TARGET_STEP_MS.get(args.preset),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        **machine_info(device),
    }
    name = f"bench_train_step_{args.preset}" + (f"_{args.tag}" if args.tag else "")
    write_results(name, results)


if __name__ == "__main__":
    main()
