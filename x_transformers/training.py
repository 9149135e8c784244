"""Shared pieces of the training scripts (train_enwik8.py, train_copy.py) and of generate.py.

Device and precision choice, torchrun process groups (DDP or FSDP2), byte corpora in plain or compressed files,
command-line checks that turn bad input into one-line usage errors, self-describing checkpoints (model
configuration, data checksum, arguments, and every RNG needed for an exact resume) written atomically, the rules
for resuming a run with other arguments, the training step (eager, compiled, or one CUDA graph, with a logged
fallback), tokens/s and model FLOP utilization, a metrics CSV with its matplotlib plot, and a Ctrl-C handler that lets
the current step finish so the checkpoint is always consistent.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import gzip
import hashlib
import json
import lzma
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from loguru import logger
from torch import nn

# device and precision


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given ('cpu', 'cuda', 'cuda:1'), else cuda when available, else cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16 on GPU, fp32 (no autocast) on CPU unless asked otherwise."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}, expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype, cache: bool = True):
    """`cache=False` for a region captured as a CUDA graph: autocast's cache of cast weights would keep tensors from
    the capture alive outside it."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


# distributed (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str | None = None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun; NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), pick_device(device_name)

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank), device


def cleanup_distributed(dist_info: Dist):
    if dist_info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def finish(dist_info: Dist):
    """End a run once every file is written: tear down the process group, and leave distributed runs through
    `os._exit`. Freeing a DDP model after its gloo process group can deadlock at interpreter exit (the group's
    destructor joins a worker thread that waits for the GIL the freeing thread holds), seen on CPU CI runs."""
    cleanup_distributed(dist_info)
    if dist_info.enabled:
        logger.complete()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def setup_logging(dist_info: Dist, write=None):
    """Rank 0 logs (through `write`, e.g. tqdm.write, so progress bars stay intact); other ranks only warn."""
    logger.remove()
    sink = write if write is not None else (lambda msg: print(msg, end=""))
    level = "INFO" if dist_info.is_main else "WARNING"
    logger.add(lambda msg: sink(msg.rstrip("\n")), level=level, format="{time:HH:mm:ss} | {level: <7} | {message}")


def wrap_model(
    model: nn.Module, dist_info: Dist, device: torch.device, fsdp: bool = False, reshard_after_forward: bool = True
) -> nn.Module:
    """DDP by default; with `fsdp`, FSDP2 `fully_shard` on each layer's block then the root.
    `reshard_after_forward=False` keeps each block's gathered weights from forward to backward: one all-gather per
    block and micro-batch instead of two, at the memory of unsharded weights (ZeRO-2-like)."""
    if not dist_info.enabled:
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the mesh of the training device (fully_shard's default is the accelerator's, also for a CPU run beside a GPU)
    mesh = init_device_mesh(device.type, (dist_info.world_size,))
    # blocks return reshaped (view) outputs and the residual adds out of place, so FSDP2's warning about in-place
    # ops on views does not apply; tests/test_train.py checks FSDP2 losses equal DDP's step for step
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # one group per block: one all-gather and one reduce-scatter per layer, one block's full weights at a time; the
    # root group (embeddings, norms, logits) stays gathered after forward, as backward starts with it
    for block in find_layer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


@contextlib.contextmanager
def root_gathered(model: nn.Module):
    """Generation calls the wrapped network's parts (embeddings, `net`, encoder / decoder) rather than the root's
    forward, so FSDP2's root hooks never gather the root group: gather it here for the duration. Block groups
    gather themselves when called. A no-op for DDP or a single process."""
    if not hasattr(model, "unshard"):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when `sync` (the last
    micro-batch of an accumulation step), under DDP (`no_sync`) and FSDP2 (`set_requires_gradient_sync`) alike."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    elif hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def find_layer_blocks(model: nn.Module) -> list[nn.Module]:
    """The attention / feedforward / mixer block of each layer of every AttentionLayers inside `model`. Each entry of
    `layers` is a ModuleList (norms, block, residual); the block is its middle item. Norms and gated residuals are
    left to the root group: their weights are tiny, and a group costs host time per micro-batch (hooks, copy-in/out)."""
    blocks = []
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if not (isinstance(layers, nn.ModuleList) and hasattr(module, "layer_types")):
            continue
        for entry in layers:
            block = entry[1] if isinstance(entry, nn.ModuleList) and len(entry) == 3 else entry
            if any(True for _ in block.parameters()):
                blocks.append(block)
    return blocks


def is_fsdp(model: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers (FSDP2 shards in place, nothing to unwrap)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def all_reduce_mean(value: float, dist_info: Dist, device: torch.device) -> float:
    if not dist_info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist_info.world_size


class GraphedTrainStep:
    """One training step (forward under autocast, backward, optimizer step) captured once as a CUDA graph and
    replayed: a small model's eager step is bound by the host launching ~1000 kernels, the replay by the GPU alone.

    `step(batch)` copies the batch into the captured input and replays; it returns the step's loss (a device tensor,
    no host sync). The batch shape is fixed, the optimizer must be capturable (e.g. `Adam(..., capturable=True)` or
    fused), its learning rate a tensor if a schedule changes it, and gradients are not zeroed between steps: the
    captured backward writes them afresh. A few eager warm-up steps run first, on a side stream, to compile kernels
    and create the optimizer state (they train too, on `example`)."""

    def __init__(self, loss_fn, optimizer: torch.optim.Optimizer, example: torch.Tensor, dtype: torch.dtype,
                 warmup: int = 3):
        if example.device.type != "cuda":
            raise ValueError(f"GraphedTrainStep needs CUDA tensors, got a batch on {example.device}")
        self.loss_fn, self.optimizer, self.dtype = loss_fn, optimizer, dtype
        self.static_input = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._eager_step()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step_body(cache_enabled=False)

    def _step_body(self, cache_enabled=True) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=cache_enabled):
            loss = self.loss_fn(self.static_input)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _eager_step(self):
        self._step_body()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape != self.static_input.shape:
            raise ValueError(f"GraphedTrainStep was captured for batches of {tuple(self.static_input.shape)}, "
                             f"got {tuple(batch.shape)}")
        self.static_input.copy_(batch, non_blocking=True)
        self.graph.replay()
        return self.static_loss.clone()


class StepLosses:
    """Per-step training losses kept on the device and read back in one transfer (one all-reduce across ranks) when
    the loop logs, every few steps. Reading a loss (`.item()`) waits for the GPU to drain its queue and leaves it
    idle while the host launches the next step; a small model's loop is host-bound, so once a step costs that.

        losses = StepLosses(dist_info, device, tokens_per_step)
        losses.add(step, loss_sum / grad_accum)       # no sync
        losses.add(step, loss, warmup=True)           # a step of one-off work (compilation, graph capture): untimed
        for step, loss, tokens_per_s in losses.flush(): ...   # every log step: rows for the steps since the last
        losses.resume()                               # keep validation and checkpoints out of the tokens/s clock

    Warm-up steps come first: each waits for the device once, and the clock starts after the last of them.
    """

    def __init__(self, dist_info: Dist, device: torch.device, tokens_per_step: int):
        self.dist_info, self.device, self.tokens_per_step = dist_info, device, tokens_per_step
        self.pending: list[tuple[int, torch.Tensor, bool]] = []
        self.train_time, self.train_tokens, self.warmup_steps = 0.0, 0, 0
        self.mark = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, warmup: bool = False):
        self.pending.append((step, loss.detach().float().reshape(()), not warmup))
        if warmup:
            # the step's one-off work is done when its kernels are: wait for them, then start the clock
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.warmup_steps += 1
            self.mark = time.perf_counter()

    def flush(self) -> list[tuple[int, float, float | None]]:
        """(step, loss averaged over ranks, tokens/s averaged over the flushed timed steps, or None for a warm-up
        step) for each pending step. Every rank must call it at the same steps (a collective under torchrun)."""
        if not self.pending:
            return []
        values = torch.stack([loss for _, loss, _ in self.pending]).double()
        if self.dist_info.enabled:
            dist.all_reduce(values)
            values /= self.dist_info.world_size
        values = values.tolist()  # the one host sync
        elapsed = time.perf_counter() - self.mark
        timed = sum(1 for *_, is_timed in self.pending if is_timed)
        tokens = self.tokens_per_step * timed
        if timed:
            self.train_time, self.train_tokens = self.train_time + elapsed, self.train_tokens + tokens
        rows = [(step, value, tokens / elapsed if is_timed else None)
                for (step, _, is_timed), value in zip(self.pending, values)]
        self.pending = []
        self.mark = time.perf_counter()
        return rows

    def resume(self):
        """Restart the clock (after validation, sampling or a checkpoint, which are not training time)."""
        self.mark = time.perf_counter()

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_time if self.train_time > 0 else 0.0


# the training step: eager, compiled, or one CUDA graph

STEP_MODES = ("auto", "eager", "compile", "graph")
# what `auto` tries on a GPU, fastest first (H100, enwik8 model, 16 x 1024: compiled 1.64M tokens/s, the eager step
# captured as a CUDA graph 1.40M, eager 0.70M); each one falls back to the next if its first step raises
AUTO_STEP_MODES = ("compile", "graph", "eager")
# eager steps before a CUDA graph is captured: kernels chosen, workspaces and optimizer state allocated
GRAPH_WARMUP_STEPS = 3


def step_modes(requested: str, device: torch.device, dist_info: Dist, auto=AUTO_STEP_MODES) -> list[str]:
    """The step modes to try, in order (see `TrainStep`). An explicit mode is the only one: if it fails, the run
    fails. `auto` is the chain `auto` on a GPU in one process; eager on the CPU, where compiling takes longer than a short run
    gains back, and under torchrun, where a compiled first step that fails inside backward leaves DDP's
    gradient reducer waiting for the rest of its reduction (it cannot be retried eagerly) and a graph would have to
    capture the collectives (give --step-mode compile to compile there)."""
    if requested not in STEP_MODES:
        raise UsageError(f"--step-mode {requested!r}: expected one of {', '.join(STEP_MODES)}")
    if requested != "auto":
        return [requested]
    if device.type == "cuda" and not dist_info.enabled:
        return list(auto)
    return ["eager"]


def check_step_mode(args):
    """--compile is the older spelling of --step-mode compile; --step-mode graph needs CUDA and one process. Sets
    `args.step_mode` from --compile; a UsageError for a combination that cannot run."""
    mode = getattr(args, "step_mode", None)
    if mode is None:
        return
    if getattr(args, "compile", False):
        if mode not in ("auto", "compile"):
            raise UsageError(f"--compile is --step-mode compile, and --step-mode {mode} was given too: "
                             "give one of them")
        args.step_mode = mode = "compile"
    if mode == "graph":
        if pick_device(getattr(args, "device", None)).type != "cuda":
            raise UsageError("--step-mode graph captures the step as a CUDA graph and needs a CUDA device; on the CPU "
                             "use auto, eager or compile")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--step-mode graph runs in one process (the graph would have to capture the gradient "
                             "all-reduce); under torchrun use auto, eager or compile")


def add_step_args(p: argparse.ArgumentParser, auto=AUTO_STEP_MODES, peak_tflops: bool = False):
    """The flags of how the training step runs (`auto`: the script's chain on one GPU) and, with `peak_tflops`, of the
    MFU shown beside tokens/s."""
    chain = f"{auto[0]}, falling back to {' and then '.join(auto[1:])}" if len(auto) > 1 else auto[0]
    p.add_argument("--step-mode", default="auto", choices=STEP_MODES,
                   help="how the training step runs: eager; compile (torch.compile the model); graph (the whole "
                        "step, micro-batches, clipping and Adam, captured as one CUDA graph after a few eager steps); "
                        f"auto: on one GPU {chain} (with a warning) where a mode fails on its first step; eager on "
                        "the CPU and under torchrun")
    p.add_argument("--compile", action="store_true", help="same as --step-mode compile")
    if peak_tflops:
        p.add_argument("--peak-tflops", type=positive_float, default=None,
                       help="the device's peak FLOP/s (in TFLOP/s) for the MFU on the progress bar (default: from "
                            "the GPU's name under bf16: H100 and H200 989, A100 312; no MFU on the CPU or another "
                            "GPU)")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device` without the host waiting for the GPU. A plain `.to("cuda")` from pageable memory
    synchronizes the stream (PyTorch copies through `memcpy_and_sync`), which would stop the host from queueing the
    next step once per micro-batch; from pinned memory the copy is asynchronous, and the caching host allocator keeps
    the pinned block until the copy is done."""
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def set_optimizer_options(optimizer: torch.optim.Optimizer, **options):
    """Set per-group options such as `fused` or `capturable` on an optimizer, e.g. again after `load_state_dict`,
    which takes every group option from the checkpoint (a run saved on the CPU would resume on a GPU unfused).
    Fused and capturable Adam keep each parameter's step count on its device: moved there."""
    for group in optimizer.param_groups:
        group.update(options)
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[param]["step"] = step.to(dtype=torch.float32, device=param.device)


class TrainStep:
    """One optimizer step: each micro-batch through `loss_fn(module, *tensors)` under autocast and backward
    (gradients reduced across ranks on the last micro-batch only), the gradient norm clipped to `clip`, the optimizer
    step, the gradients dropped. `step(micro_batches)` takes a list of tuples of tensors (on the host or the device)
    and returns the mean loss as a device tensor (no host sync). The same arithmetic runs one of three ways:

    - eager: the module as is;
    - compile: `torch.compile(model)` for forward and backward (clipping and the fused Adam step stay eager);
    - graph: `GRAPH_WARMUP_STEPS` eager steps (real steps of the run, on a side stream), then the whole step - every
      micro-batch, the clip and the optimizer step - captured once as a CUDA graph and replayed with each step's
      batches copied into its inputs. One process on CUDA, batches of a fixed shape, a capturable optimizer
      (`Adam(..., fused=True, capturable=True)`) whose learning rate does not change while it runs.

    `modes` is the chain to try, in order (`step_modes`). While the first step of a mode has not succeeded (its
    compilation or capture) and another mode follows, a failure is logged as one warning naming the reason and the
    next mode takes over the same step: gradients are dropped and the RNG state restored, so the run trains the
    same batches as if it had started in that mode. After that, errors are errors.

    `warmup` says whether the last step did one-off work (compilation, graph warm-up or capture, CUDA's lazy
    initialization on a first eager GPU step), which tokens/s leaves out (`StepLosses.add(..., warmup=True)`).
    The weights are the model's own: validation and sampling use the plain module between steps, and a compiled
    run's state dict has the plain module's keys."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, modes, device: torch.device,
                 dtype: torch.dtype, clip: float | None = None):
        if not modes:
            raise ValueError("TrainStep needs at least one step mode")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.modes, self.device, self.dtype, self.clip = list(modes), device, dtype, clip
        self.module, self.graph, self.steps, self.settled, self.warmup = None, None, 0, False, False
        self.side, self.static, self.static_loss = None, None, None

    @property
    def mode(self) -> str:
        return self.modes[0]

    def __call__(self, micro_batches) -> torch.Tensor:
        fell_back = False
        while True:
            retry = len(self.modes) > 1 and not self.settled
            rng = self._rng_state() if retry else None
            try:
                loss = self._graph_step(micro_batches) if self.mode == "graph" else self._eager_step(micro_batches)
            except Exception as error:  # compilation and capture raise many kinds
                if not retry:
                    raise
                self._fall_back(error, rng)
                fell_back = True
                continue
            # the failed attempt's time is one-off work too
            self.warmup = self.warmup or fell_back
            return loss

    def _fall_back(self, error: Exception, rng):
        failed = self.modes.pop(0)
        reason = f"{type(error).__name__}: {one_line(error)}"
        logger.warning(f"step mode {failed} failed on its first step ({reason[:300]}); falling back to {self.mode}")
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], self.device)
        self.module, self.graph, self.static, self.static_loss, self.steps = None, None, None, None, 0

    def _rng_state(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _on_device(self, micro_batches):
        return [tuple(to_device(t, self.device) for t in micro) for micro in micro_batches]

    def _body(self, micro_batches, cache: bool = True) -> torch.Tensor:
        """Forward and backward of every micro-batch, clip, optimizer step; the mean loss (a device tensor)."""
        total, count = None, len(micro_batches)
        for i, micro in enumerate(micro_batches):
            with gradient_sync(self.model, i == count - 1):
                with autocast(self.device, self.dtype, cache=cache):
                    loss = self.loss_fn(self.module, *micro)
                (loss / count).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return total / count

    def _eager_step(self, micro_batches) -> torch.Tensor:
        if self.module is None:
            self.module = torch.compile(self.model) if self.mode == "compile" else self.model
        loss = self._body(self._on_device(micro_batches))
        self.optimizer.zero_grad(set_to_none=True)
        self.warmup = self.steps == 0 and (self.mode == "compile" or self.device.type == "cuda")
        self.steps += 1
        self.settled = True
        return loss

    def _graph_step(self, micro_batches) -> torch.Tensor:
        self.module = self.model
        if self.graph is None and self.steps < GRAPH_WARMUP_STEPS:
            # on a side stream, as for the capture: what these steps set up (cuBLAS workspaces, autograd's streams) is
            # then what the graph replays with
            main = torch.cuda.current_stream(self.device)
            # one side stream for all of them: the caching allocator keeps each stream's freed blocks for that stream
            if self.side is None:
                self.side = torch.cuda.Stream(self.device)
            side = self.side
            side.wait_stream(main)
            with torch.cuda.stream(side):
                loss = self._body(self._on_device(micro_batches))
                self.optimizer.zero_grad(set_to_none=True)
            main.wait_stream(side)
            self.steps += 1
            self.warmup = True
            return loss.clone()
        if self.graph is None:
            self._capture(micro_batches)
            self.warmup = True
        else:
            self.warmup = False
        shapes = [tuple(t.shape for t in micro) for micro in micro_batches]
        if shapes != [tuple(t.shape for t in micro) for micro in self.static]:
            raise ValueError(f"the CUDA graph was captured for micro-batches of shapes "
                             f"{[tuple(t.shape for t in micro) for micro in self.static]}, got {shapes}")
        for static, micro in zip(self.static, micro_batches):
            for s, t in zip(static, micro):
                s.copy_(t.pin_memory() if t.device.type == "cpu" else t, non_blocking=True)
        self.graph.replay()
        self.steps += 1
        self.settled = True
        return self.static_loss.clone()

    def _capture(self, micro_batches):
        self.static = [tuple(torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in micro)
                       for micro in micro_batches]
        # the captured backward allocates the gradients from the graph's pool, and each replay writes them afresh
        self.optimizer.zero_grad(set_to_none=True)
        main = torch.cuda.current_stream(self.device)
        graph, failure = torch.cuda.CUDAGraph(), None
        try:
            with torch.cuda.graph(graph):
                try:
                    self.static_loss = self._body(self.static, cache=False)
                except Exception as error:
                    # reported below rather than the capture's own "invalidated" error when the capture ends
                    failure = error
        except Exception as error:
            # a capture that fails to end leaves its side stream current: back to the stream the loop runs on
            torch.cuda.set_stream(main)
            raise (failure or error) from None
        if failure is not None:
            raise failure
        self.graph = graph


# model FLOP utilization

# dense bf16 tensor-core peaks (TFLOP/s) by GPU name, the first match wins; MFU is shown only where one matches (or
# --peak-tflops is given)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_flops(device: torch.device, dtype: torch.dtype, tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU: `tflops` when given, else the table's bf16 figure for the GPU's name when
    the run trains under bf16 autocast; None on the CPU, an unknown GPU or an fp32 run (no figure to divide by)."""
    if tflops is not None:
        return tflops * 1e12
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))


def peak_tflops_for(name: str) -> float | None:
    for pattern, tflops in PEAK_TFLOPS:
        if pattern.lower() in name.lower():
            return tflops * 1e12
    return None


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of a language model on windows of `seq_len` tokens, counted as for PaLM's MFU:

        6 N + 6 T sum over attention layers of heads (dim_head + value_dim_head)
            = 6 N + 12 depth dim T        for the classic decoder (dim = heads x dim_head)

    N is the parameters that multiply: all of them but the embedding tables, which are looked up (a token embedding
    tied to the logits multiplies, and counts); each does a multiply-add (2 FLOPs) per token forward and twice that
    backward, hence 6. The second term is attention's scores (q k) and weighted values, 2 T (heads dim_head +
    heads value_dim_head) per token and layer forward, three times that in training, over all T positions: a causal
    layer computes half of them, but PaLM's convention counts them all, so MFU figures compare across reports.
    Recurrent mixers count through their projections' parameters only."""
    from x_transformers.attention import Attention
    from x_transformers.x_transformers import TiedEmbeddingLogits

    n = sum(p.numel() for p in model.parameters())
    n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    n += sum(m.token_emb.emb.weight.numel() for m in model.modules()
             if isinstance(getattr(m, "to_logits", None), TiedEmbeddingLogits))
    attention = sum(m.heads * (m.dim_head + m.value_dim_head) for m in model.modules() if isinstance(m, Attention))
    return 6 * n + 6 * seq_len * attention


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s over `peak` (the FLOP/s of every device the tokens ran on); None without a peak."""
    if not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


def any_rank(flag: bool, dist_info: Dist, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (so all ranks stop at the same step)."""
    if not dist_info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# data


class UsageError(ValueError):
    """Bad input from the command line (a value, a file, a checkpoint): the scripts report it with `parser.error`,
    one line and exit status 2, instead of a traceback."""


class DataError(UsageError):
    """A data or prompt file that cannot be read as bytes."""


# compressed formats by suffix, and by their first bytes for files whose name does not say
COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def _sniff(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    # bzip2: 'BZh', a block size digit, then the magic of a first block or of the end of an empty stream
    if len(head) >= 10 and head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bz2"
    return None


def file_format(path: str | Path) -> str:
    """'plain', 'gzip', 'bz2', 'xz' or 'zstd': from the suffix, else from the file's first bytes."""
    path = Path(path)
    if path.suffix.lower() in COMPRESSED_SUFFIXES:
        return COMPRESSED_SUFFIXES[path.suffix.lower()]
    with open(path, "rb") as f:
        return _sniff(f.read(16)) or "plain"


class _Truncated(EOFError):
    pass


def _read_zstd(raw_file, max_bytes: int | None) -> bytes:
    """Every frame of a .zst file, decompressed (the first `max_bytes`). A stream that stops inside a frame is an
    error: zstandard's readers would hand back what they have without saying."""
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is None:
        try:  # the standard library's module, from Python 3.14
            from compression import zstd
        except ImportError:
            raise DataError("reading .zst files needs the zstandard package: pip install zstandard") from None
        with zstd.ZstdFile(raw_file) as f:
            return _read_up_to(f, max_bytes)

    chunks, total = [], 0
    frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
    while max_bytes is None or total < max_bytes:
        pending = raw_file.read(1 << 20)
        if not pending:
            if fed and not frame.eof:
                raise _Truncated("the data ends inside a zstd frame (truncated or not zstd data)")
            break
        while pending:
            out = frame.decompress(pending)
            fed = True
            chunks.append(out)
            total += len(out)
            pending = b""
            if frame.eof:  # a frame ended: the rest of the chunk starts the next one
                pending = frame.unused_data
                frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
    data = b"".join(chunks)
    return data if max_bytes is None else data[:max_bytes]


def _read_up_to(f, max_bytes: int | None) -> bytes:
    if max_bytes is None:
        return f.read()
    # decompressing readers may return less than asked before the end of the stream
    chunks, left = [], max_bytes
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_bytes(path: str | Path, max_bytes: int | None = None, what: str = "--data") -> bytes:
    """The bytes of a plain, .gz, .bz2, .xz or .zst file (the first `max_bytes` of them, decompressed). Every
    failure - missing, a folder, unreadable, corrupt or truncated, empty - is a DataError naming `what` and the
    file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file")
    try:
        kind = file_format(path)
        with open(path, "rb") as raw_file:
            if kind == "plain":
                data = _read_up_to(raw_file, max_bytes)
            elif kind == "zstd":
                data = _read_zstd(raw_file, max_bytes)
            else:
                readers = dict(gzip=lambda: gzip.GzipFile(fileobj=raw_file), bz2=lambda: bz2.BZ2File(raw_file),
                               xz=lambda: lzma.LZMAFile(raw_file))
                with readers[kind]() as f:
                    data = _read_up_to(f, max_bytes)
    except DataError as error:
        raise DataError(f"{what} {path}: {error}") from None
    except (OSError, EOFError, lzma.LZMAError, ValueError) as error:
        # zstandard raises its own ZstdError, a subclass of none of these: caught below by name
        raise DataError(f"{what} {path} cannot be read as {_format_name(path)}: {one_line(error)}") from None
    except Exception as error:
        if type(error).__name__ != "ZstdError":
            raise
        raise DataError(f"{what} {path} cannot be read as {_format_name(path)}: {one_line(error)}") from None
    if len(data) == 0:
        raise DataError(f"{what} {path} is empty")
    return data


def _format_name(path: Path) -> str:
    try:
        kind = file_format(path)
    except OSError:
        return "a file"
    return "a plain file" if kind == "plain" else f"{kind} data"


def one_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name), for one-line usage errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_bytes(path: str | Path, max_bytes: int | None = None) -> torch.Tensor:
    """A plain or compressed file (see `read_bytes`) as a uint8 tensor of its bytes."""
    return bytes_tensor(read_bytes(path, max_bytes))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_bytes(data: torch.Tensor, train_bytes: int | None = None, val_fraction: float = 0.1):
    """First `train_bytes` (or the first 1 - val_fraction) for training, the rest for validation."""
    if train_bytes is not None and train_bytes < len(data):
        n_train = train_bytes
    else:
        n_train = int(len(data) * (1 - val_fraction))
    return data[:n_train], data[n_train:]


def random_crops(data: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of `length` tokens, drawn with `generator` so resuming replays the same batches."""
    if len(data) <= length:
        raise ValueError(f"corpus split of {len(data)} bytes is too short for windows of {length} tokens")
    starts = torch.randint(0, len(data) - length, (batch_size,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()]).long()


def document_positions(windows: torch.Tensor, separator: bytes) -> torch.Tensor:
    """Packed training rows: each token's position (b, n) within its document, documents ending with `separator`
    (its last byte is the last token of a document; in a run of separators, every further byte ends one more) and
    each row starting a document (its first, cut one). Position
    ids that restart at 0 are what `TransformerWrapper(..., pos=)` takes as a packed batch."""
    if not separator:
        raise UsageError("the document separator must not be empty")
    b, n = windows.shape
    sep = torch.tensor(list(separator), dtype=windows.dtype, device=windows.device)
    ends = torch.zeros(b, n, dtype=torch.bool, device=windows.device)
    if n >= len(sep):
        matches = windows.unfold(1, len(sep), 1).eq(sep).all(dim=-1)  # (b, n - len + 1), a match starting at t
        ends[:, len(sep) - 1 :] = matches
    starts = torch.nn.functional.pad(ends[:, :-1], (1, 0), value=True)
    index = torch.arange(n, device=windows.device).expand(b, n)
    last_start = torch.where(starts, index, 0).cummax(dim=1).values
    return index - last_start


def packed_targets(windows: torch.Tensor, positions: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets (b, n - 1) of packed rows: the first token of a document is not predicted from the end of
    the one before it."""
    return windows[:, 1:].masked_fill(positions[:, 1:] == 0, ignore_index)


def printable(text: str) -> str:
    """Control characters other than newline / tab shown as spaces: a byte model's output never drives the
    terminal (escape sequences, carriage returns)."""
    return "".join(c if c.isprintable() or c in "\n\t" else " " for c in text)


def decode_bytes(tokens) -> str:
    """Bytes to readable text: invalid UTF-8 replaced, control characters other than newline/tab shown as spaces."""
    return printable(bytes(int(t) for t in tokens).decode("utf-8", errors="replace"))


def check_windows(splits: dict[str, torch.Tensor], window: int, source: str, flag: str = "--seq-len"):
    """Every split must hold at least one training window of `window` tokens (random_crops draws starts from
    [0, len - window), so a split needs window + 1 bytes)."""
    for name, split in splits.items():
        if len(split) <= window:
            raise UsageError(
                f"{source}: the {name} split has {len(split):,} bytes, windows of {flag} {window - 1} need at least "
                f"{window + 1:,}; use a longer file or a smaller {flag}"
            )


# random state: everything a resumed run needs to replay the same batches, dropout masks and samples


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    state["generators"] = {name: gen.get_state() for name, gen in generators.items()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fork_rng(device: torch.device):
    """Global RNG changes inside the block (e.g. sampling generations) are undone when it exits."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# checkpoints


def save_checkpoint(path: str | Path, state: dict):
    """Write to a temp file beside `path`, then rename: a crash mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, dist_info: Dist) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; a collective call under FSDP, cheap otherwise."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict):
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def checkpoint(path, model, optimizer, step: int, args: dict, generators: dict, dist_info: Dist, extra: dict | None = None):
    """Gather state (all ranks), then rank 0 writes it with every rank's RNG state (`generators`: the script's own
    torch.Generators by name, e.g. train and validation data streams). `extra` adds keys, e.g. the model
    configuration and the data's checksum that make the checkpoint self-describing."""
    model_state, optim_state = training_state(model, optimizer, dist_info)
    rng = rng_state(generators)
    rngs = [rng]
    if dist_info.enabled:
        rngs = [None] * dist_info.world_size
        dist.all_gather_object(rngs, rng)
    if dist_info.is_main:
        state = dict(model=model_state, optimizer=optim_state, step=step, args=args, rng=rngs, **(extra or {}))
        save_checkpoint(path, state)
    if dist_info.enabled:
        dist.barrier()


class CheckpointError(UsageError):
    """A checkpoint file that is missing, unreadable, truncated, or not one of these scripts' checkpoints."""


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint loaded on the CPU (tensors and plain Python values only: no code runs while loading)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds (zip, pickle, EOF, OS errors) for a damaged file
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {one_line(error)}") from None
    if not (isinstance(state, dict) and "model" in state and "step" in state):
        raise CheckpointError(f"{path} is not a checkpoint of the training scripts (no model weights and step)")
    return state


def restore(state: dict, model, optimizer, generators: dict, dist_info: Dist, source="checkpoint") -> int:
    """Load a loaded checkpoint's model, optimizer and this rank's RNG state; returns the number of steps done."""
    try:
        load_training_state(model, optimizer, state["model"], state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{source}: its weights do not fit the model: {one_line(error)}") from None
    rngs = state["rng"]
    if len(rngs) == dist_info.world_size:
        set_rng_state(rngs[dist_info.rank], generators)
    else:
        logger.warning(f"checkpoint has RNG state of {len(rngs)} ranks, running {dist_info.world_size}: reseeding")
    return state["step"]


def resume(path, model, optimizer, generators: dict, dist_info: Dist) -> int:
    """Load model, optimizer and this rank's RNG state; returns the number of steps already done."""
    return restore(load_checkpoint(path), model, optimizer, generators, dist_info, source=str(path))


# models a checkpoint describes


def build_model(config: dict) -> nn.Module:
    """The model a checkpoint's `config` describes, so that it can be rebuilt without the training script:

        {"model": "decoder", "num_tokens": 256, "max_seq_len": 1024, "decoder": {Decoder keywords},
         "wrapper": {other TransformerWrapper keywords} (optional), ...}
            -> AutoregressiveWrapper(TransformerWrapper(num_tokens, max_seq_len, **wrapper, attn_layers=Decoder(...)))
        {"model": "xtransformer", "kwargs": {XTransformer keywords}, ...}  -> XTransformer(...)

    Other keys (e.g. "task") describe what the tokens mean, for generate.py. train_enwik8.py writes no "wrapper" (its
    flags are Decoder keywords); x_transformers.hf's import writes one for a model with wrapper keywords (tied
    embeddings, say), read the same way there."""
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper, XTransformer

    kind = config.get("model") if isinstance(config, dict) else None
    if kind == "decoder":
        net = TransformerWrapper(num_tokens=config["num_tokens"], max_seq_len=config["max_seq_len"],
                                 attn_layers=Decoder(**config["decoder"]), **config.get("wrapper", {}))
        return AutoregressiveWrapper(net)
    if kind == "xtransformer":
        return XTransformer(**config["kwargs"])
    raise UsageError(f"unknown model configuration {config!r}: expected model 'decoder' or 'xtransformer'")


def check_model_config(config: dict):
    """Build the model on the meta device (no memory, no arithmetic): a bad model flag or --config keyword fails
    here, as a UsageError, before any real model is built."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # the real build warns once, later
            build_model(config)
    except UsageError:
        raise
    except Exception as error:  # the layers' own checks raise ValueError, TypeError, AssertionError...
        raise UsageError(f"the model flags and --config do not make a model: {one_line(error)}") from None


# command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows each flag's default; not where there is nothing to show
    (None: the help text says what happens then; False: a switch that is off)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _number(text: str, kind, check, requirement: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}")
    if not (math.isfinite(value) and check(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "at least 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v < 2**63, "0 or more (below 2**63)")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "above 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "0 or more")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "above 0 and at most 1")


def explicit_args(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The destinations the command line set itself (rather than left at their defaults): parse again into a
    namespace already holding a marker for each, which argparse leaves alone unless the flag is given."""
    marker = object()
    namespace = argparse.Namespace(**{dest: marker for dest in vars(parser.parse_args(argv))})
    parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not marker}


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_device(name: str | None):
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {name!r} is not a device ({one_line(error)}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def parse_json_config(text: str, what: str) -> dict:
    """--config: an inline JSON object, or the path of a file holding one."""
    path, source = Path(text), "--config"
    if path.is_file():
        try:
            text, source = path.read_text(), f"--config file {path}"
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--config file {path} cannot be read: {one_line(error)}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if source == "--config" and not text.lstrip().startswith(("{", "[")):
            raise UsageError(f"--config {text!r} is neither a file nor a JSON object") from None
        raise UsageError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{source} must be a JSON object of {what} keywords, got {type(value).__name__} {text.strip()}")
    return value


# resuming with other arguments

# flags about this invocation rather than the run: never taken from the checkpoint, free to differ from it
PER_INVOCATION = frozenset({"resume", "overwrite", "out_dir", "device", "dtype", "compile", "step_mode", "peak_tflops",
                            "fsdp", "fsdp_keep_params"})


def _show(value) -> str:
    return "unset" if value is None else str(value)


@dataclass
class RunArgs:
    """A training command line, checked: the arguments (with a resumed run's own filled in), which ones the user
    gave, the checkpoint path, the checkpoint to resume (loaded on the CPU), lines to log once logging is set up,
    and the conflicts with the stored run that `refuse_conflicts` turns into one usage error."""

    parser: argparse.ArgumentParser
    args: argparse.Namespace
    given: set
    checkpoint: Path
    state: dict | None = None
    notes: list = field(default_factory=list)
    conflicts: list = field(default_factory=list)

    def error(self, message: str):
        self.parser.error(message)

    def check_stored(self, key: str, value: dict, what: str):
        """Compare what this run would store under `key` with what the resumed checkpoint stored."""
        if self.state is None or self.conflicts:
            return
        stored = self.state.get(key)
        if stored is not None and stored != value:
            self.conflicts.append(f"another {what} ({json.dumps(stored, sort_keys=True)}; "
                                  f"given {json.dumps(value, sort_keys=True)})")

    def check_data(self, data: dict, flag: str = "--data"):
        """`data` is {"path", "sha256", "bytes"}: the bytes decide, a moved or renamed copy is fine."""
        if self.state is None:
            return
        stored = self.state.get("data")
        if stored is None:
            self.notes.append(f"resume: the checkpoint records no data checksum, so {flag} {data['path']} is not "
                              "checked against the data the run began with")
        elif stored["sha256"] != data["sha256"]:
            self.conflicts.append(f"{flag} {stored['path']} ({stored['bytes']:,} bytes, sha256 {stored['sha256'][:12]}; "
                                  f"given {data['path']}: {data['bytes']:,} bytes, sha256 {data['sha256'][:12]})")
        elif stored["path"] != data["path"]:
            self.notes.append(f"resume: {flag} {stored['path']} -> {data['path']} (the same bytes, "
                              f"sha256 {data['sha256'][:12]})")

    def refuse_conflicts(self):
        if self.conflicts:
            self.error(f"--resume: {self.checkpoint} was trained with " + ", ".join(self.conflicts) +
                       "; leave these flags out to continue that run, or start a new one in another --out-dir "
                       "(or here with --overwrite)")


# flags that may change together on --resume as long as their product stays: batches of 4 with 4 accumulation steps
# and batches of 16 without are the same 16 sequences per step, drawn in the same order (the crops' start offsets
# come one after the other from one generator, however many a call draws), with the same mean loss
RESHAPEABLE = (("batch_size", "grad_accum"),)


def reconcile_args(args, given: set, stored: dict, changeable, checked_elsewhere=(),
                   reshapeable=RESHAPEABLE) -> tuple[list, list]:
    """Fill `args` from a resumed run's stored arguments. A flag the user left out takes the stored value; one given
    with another value is applied with a note if it is `changeable` (learning rate, step count, cadences) and is a
    conflict otherwise (model shape, data, batch shape, seed: the run would not be the same run). A group of
    `reshapeable` flags (micro-batch size and accumulation steps) may change together when their product is
    unchanged: the steps see the same sequences. Returns (notes, conflicts)."""
    notes, conflicts = [], []
    grouped = {name for group in reshapeable for name in group}
    for name, old in stored.items():
        if name in PER_INVOCATION or name in checked_elsewhere or not hasattr(args, name):
            continue
        new = getattr(args, name)
        if name not in given:
            setattr(args, name, old)
        elif new != old and name not in grouped:
            if name in changeable:
                notes.append(f"resume: {flag_name(name)} {_show(old)} -> {_show(new)} (given on the command line)")
            else:
                conflicts.append(f"{flag_name(name)} {_show(old)} (given {_show(new)})")
    for group in reshapeable:
        if not all(name in stored and hasattr(args, name) for name in group):
            continue
        changed = [name for name in group if getattr(args, name) != stored[name]]
        if not changed:
            continue
        if math.prod(getattr(args, name) for name in group) == math.prod(stored[name] for name in group):
            moves = ", ".join(f"{flag_name(name)} {stored[name]} -> {getattr(args, name)}" for name in changed)
            notes.append(f"resume: {moves} (given on the command line; the same "
                         f"{math.prod(stored[name] for name in group)} sequences per step, in the same order)")
        else:
            conflicts += [f"{flag_name(name)} {_show(stored[name])} (given {_show(getattr(args, name))})"
                          for name in changed]
    return notes, conflicts


def parse_run_args(parser: argparse.ArgumentParser, argv, changeable, checked_elsewhere=(),
                   config_keywords: str = "model") -> RunArgs:
    """Parse a training command line and settle what it means next to `--out-dir`: a new run refuses to replace a
    checkpoint unless --overwrite; --resume loads the checkpoint and fills in the run's own arguments
    (`reconcile_args`). Every failure is a `parser.error` (one line, exit status 2). `config_keywords` names what
    --config holds, for its error messages."""
    args = parser.parse_args(argv)
    given = explicit_args(parser, argv)
    try:
        check_device(getattr(args, "device", None))
        check_step_mode(args)
        if getattr(args, "config", None) is not None:
            # stored as the JSON itself: the run stays described if the file changes or goes
            args.config = json.dumps(parse_json_config(args.config, config_keywords), sort_keys=True)
    except UsageError as error:
        parser.error(str(error))

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        parser.error(f"--out-dir {out} is a file, not a folder")
    if args.resume and getattr(args, "overwrite", False):
        parser.error("--resume continues the run in --out-dir and --overwrite replaces it: give one of them")
    run = RunArgs(parser, args, given, out / "checkpoint.pt")
    if args.resume:
        if not run.checkpoint.exists():
            parser.error(f"--resume: there is no checkpoint at {run.checkpoint} to continue; "
                         "leave out --resume to start a new run there")
        try:
            run.state = load_checkpoint(run.checkpoint)
        except UsageError as error:
            parser.error(f"--resume: {error}")
        run.notes, run.conflicts = reconcile_args(args, given, run.state.get("args", {}), changeable,
                                                  checked_elsewhere)
    elif run.checkpoint.exists() and not getattr(args, "overwrite", False):
        parser.error(f"{run.checkpoint} already holds a training run: continue it with --resume, or start over with "
                     "--overwrite (which replaces it)")
    return run


OUTPUT_FILES = ("checkpoint.pt", "metrics.csv", "loss.png")


def start_run(args, write=None, notes=()):
    """The start both training scripts share: process group and device, rank-0 logging, autocast dtype, output
    folder, and seeds - the same on every rank for identical initial weights, while the train / validation data
    streams (`generators`) differ per rank. With --overwrite, rank 0 first removes the earlier run's outputs, so the
    folder never mixes two runs. `notes` (from `parse_run_args`) are logged. Returns
    (dist_info, device, dtype, out, generators)."""
    dist_info, device = setup_distributed(args.device)
    setup_logging(dist_info, write=write)
    for note in notes:
        logger.info(note)
    dtype = pick_dtype(args.dtype, device)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(args, "overwrite", False) and dist_info.is_main:
        removed = [name for name in OUTPUT_FILES if (out / name).exists()]
        for name in removed:
            (out / name).unlink()
        if removed:
            logger.info(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}")
    if dist_info.enabled:
        dist.barrier()
    seed_everything(args.seed)
    generators = dict(
        train=torch.Generator().manual_seed(args.seed + dist_info.rank),
        val=torch.Generator().manual_seed(args.seed + 10_000 + dist_info.rank),
    )
    return dist_info, device, dtype, out, generators


def written_outputs(out: Path) -> str:
    """The output files that exist, for the closing log line (a run stopped early or without matplotlib has no
    plot: name only what is there)."""
    names = [name for name in OUTPUT_FILES if (Path(out) / name).exists()]
    return ", ".join(names) if names else "nothing yet"


def prepare_run(model, args, out: Path, generators: dict, metric_columns: list[str], dist_info: Dist, device,
                loss_fn, dtype: torch.dtype, modes=("eager",), state: dict | None = None, extra: dict | None = None):
    """The setup both training scripts share: wrap the model (DDP / FSDP2), Adam, resume from `out/checkpoint.pt`
    (`state`: that checkpoint already loaded, as `parse_run_args` does), the training step (`TrainStep` with
    `loss_fn`, the step `modes` to try and `args.clip`), and the metrics CSV. `extra` goes into every checkpoint
    (model configuration, data checksum). Returns (model, optimizer, plain, train_step, start, metrics, save): `plain`
    is the unwrapped module for validation and generation, `save(step)` writes the checkpoint atomically. A
    checkpoint whose weights do not fit raises a CheckpointError naming it."""
    model = wrap_model(model, dist_info, device, fsdp=args.fsdp,
                       reshard_after_forward=not getattr(args, "fsdp_keep_params", False))
    # fused Adam on CUDA: one kernel for all parameters (also sharded DTensors) instead of a dozen foreach launches;
    # capturable when a CUDA graph may capture its step (fused Adam keeps its step counts on the GPU anyway)
    options = dict(fused=device.type == "cuda", capturable="graph" in modes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, **options)
    plain = unwrap(model)

    ckpt_path = out / "checkpoint.pt"
    start = 0
    if args.resume:
        state = load_checkpoint(ckpt_path) if state is None else state
        start = restore(state, model, optimizer, generators, dist_info, source=str(ckpt_path))
        # the optimizer state carries the options and the learning rate it was saved with; this process's options
        # and the run's --lr (the stored one, or a new one given on the command line) are the ones to train with
        set_optimizer_options(optimizer, lr=args.lr, **options)
        logger.info(f"resumed from {ckpt_path} at step {start}")
    train_step = TrainStep(model, optimizer, loss_fn, modes, device, dtype, clip=args.clip)
    metrics = Metrics(out / "metrics.csv", metric_columns, resume_step=start if args.resume else None,
                      enabled=dist_info.is_main)

    def save(step):
        checkpoint(ckpt_path, model, optimizer, step, vars(args), generators, dist_info, extra=extra)

    return model, optimizer, plain, train_step, start, metrics, save


# metrics


class Metrics:
    """Append-only CSV (one row per logged step) that survives resumes; rank 0 only."""

    def __init__(self, path: str | Path, fields: list[str], resume_step: int | None = None, enabled: bool = True):
        self.path, self.fields, self.enabled = Path(path), fields, enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.exists():
            # drop rows the interrupted run wrote after its last checkpoint: those steps are run again
            rows = [r for r in self.read() if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def read(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def log(self, **row):
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: _fmt(row.get(k)) for k in self.fields})


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def plot_metrics(csv_path, png_path, curves: dict[str, str], title: str = "", ylabel: str = "loss", logy: bool = False):
    """Plot the CSV columns named by `curves` ({column: label}) against step; empty cells are skipped. Without
    matplotlib it warns once and returns False: a missing plotting library should not stop a training run."""
    try:
        import matplotlib
    except ImportError:
        if not getattr(plot_metrics, "warned", False):
            logger.warning("matplotlib is not installed, so no loss plot: pip install matplotlib")
            plot_metrics.warned = True
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(7, 4))
    for column, label in curves.items():
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_name(Path(png_path).stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


# Ctrl-C


class StopOnSignal:
    """First SIGINT/SIGTERM asks the loop to stop (after the current step alone; under torchrun at the next step all
    ranks log, --log-every) and checkpoint; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt received: stopping at the next logged step with a checkpoint (again to abort now)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def bits_per_byte(loss: float) -> float:
    return loss / math.log(2)
