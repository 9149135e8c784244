"""Shared pieces of the training scripts (train_enwik8.py, train_copy.py).

Device and precision choice, torchrun process groups (DDP or FSDP2), byte corpora, atomic checkpoints that carry
every RNG needed for an exact resume, a metrics CSV with its matplotlib plot, and a Ctrl-C handler that lets the
current step finish so the checkpoint is always consistent.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
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


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        for step, loss, tokens_per_s in losses.flush(): ...   # every log step: rows for the steps since the last
        losses.pause() / losses.resume()              # keep validation and checkpoints out of the tokens/s clock
    """

    def __init__(self, dist_info: Dist, device: torch.device, tokens_per_step: int):
        self.dist_info, self.device, self.tokens_per_step = dist_info, device, tokens_per_step
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.train_time, self.train_tokens = 0.0, 0
        self.mark = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor):
        self.pending.append((step, loss.detach().float().reshape(())))

    def flush(self) -> list[tuple[int, float, float]]:
        """(step, loss averaged over ranks, tokens/s averaged over the flushed steps) for each pending step. Every
        rank must call it at the same steps (a collective under torchrun)."""
        if not self.pending:
            return []
        values = torch.stack([loss for _, loss in self.pending]).double()
        if self.dist_info.enabled:
            dist.all_reduce(values)
            values /= self.dist_info.world_size
        values = values.tolist()  # the one host sync
        elapsed = time.perf_counter() - self.mark
        tokens = self.tokens_per_step * len(self.pending)
        self.train_time, self.train_tokens = self.train_time + elapsed, self.train_tokens + tokens
        rows = [(step, value, tokens / elapsed) for (step, _), value in zip(self.pending, values)]
        self.pending = []
        self.mark = time.perf_counter()
        return rows

    def resume(self):
        """Restart the clock (after validation, sampling or a checkpoint, which are not training time)."""
        self.mark = time.perf_counter()

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_time if self.train_time > 0 else 0.0


def any_rank(flag: bool, dist_info: Dist, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (so all ranks stop at the same step)."""
    if not dist_info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# data


def load_bytes(path: str | Path, max_bytes: int | None = None) -> torch.Tensor:
    """A .gz or plain file as a uint8 tensor of its bytes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read(-1 if max_bytes is None else max_bytes)
    if len(raw) == 0:
        raise ValueError(f"--data {path} is empty")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


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


def decode_bytes(tokens) -> str:
    """Bytes to readable text: invalid UTF-8 replaced, control characters other than newline/tab shown as spaces."""
    text = bytes(int(t) for t in tokens).decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() or c in "\n\t" else " " for c in text)


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


def checkpoint(path, model, optimizer, step: int, args: dict, generators: dict, dist_info: Dist):
    """Gather state (all ranks), then rank 0 writes it with every rank's RNG state (`generators`: the script's own
    torch.Generators by name, e.g. train and validation data streams)."""
    model_state, optim_state = training_state(model, optimizer, dist_info)
    rng = rng_state(generators)
    rngs = [rng]
    if dist_info.enabled:
        rngs = [None] * dist_info.world_size
        dist.all_gather_object(rngs, rng)
    if dist_info.is_main:
        state = dict(model=model_state, optimizer=optim_state, step=step, args=args, rng=rngs)
        save_checkpoint(path, state)
    if dist_info.enabled:
        dist.barrier()


def resume(path, model, optimizer, generators: dict, dist_info: Dist) -> int:
    """Load model, optimizer and this rank's RNG state; returns the number of steps already done."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume given but {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    load_training_state(model, optimizer, state["model"], state["optimizer"])
    rngs = state["rng"]
    if len(rngs) == dist_info.world_size:
        set_rng_state(rngs[dist_info.rank], generators)
    else:
        logger.warning(f"checkpoint has RNG state of {len(rngs)} ranks, running {dist_info.world_size}: reseeding")
    return state["step"]


def start_run(args, write=None):
    """The start both training scripts share: process group and device, rank-0 logging, autocast dtype, output
    folder, and seeds - the same on every rank for identical initial weights, while the train / validation data
    streams (`generators`) differ per rank. Returns (dist_info, device, dtype, out, generators)."""
    dist_info, device = setup_distributed(args.device)
    setup_logging(dist_info, write=write)
    dtype = pick_dtype(args.dtype, device)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    generators = dict(
        train=torch.Generator().manual_seed(args.seed + dist_info.rank),
        val=torch.Generator().manual_seed(args.seed + 10_000 + dist_info.rank),
    )
    return dist_info, device, dtype, out, generators


def prepare_run(model, args, out: Path, generators: dict, metric_columns: list[str], dist_info: Dist, device):
    """The setup both training scripts share: wrap the model (DDP / FSDP2), Adam, optional torch.compile, resume from
    `out/checkpoint.pt`, and the metrics CSV. Returns (model, optimizer, plain, train_model, start, metrics, save):
    `plain` is the unwrapped module for validation and generation, `save(step)` writes the checkpoint atomically."""
    model = wrap_model(model, dist_info, device, fsdp=args.fsdp,
                       reshard_after_forward=not getattr(args, "fsdp_keep_params", False))
    # fused Adam on CUDA: one kernel for all parameters (also sharded DTensors) instead of a dozen foreach launches
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    plain = unwrap(model)
    train_model = torch.compile(model) if args.compile else model

    ckpt_path = out / "checkpoint.pt"
    start = 0
    if args.resume:
        start = resume(ckpt_path, model, optimizer, generators, dist_info)
        logger.info(f"resumed from {ckpt_path} at step {start}")
    metrics = Metrics(out / "metrics.csv", metric_columns, resume_step=start if args.resume else None,
                      enabled=dist_info.is_main)

    def save(step):
        checkpoint(ckpt_path, model, optimizer, step, vars(args), generators, dist_info)

    return model, optimizer, plain, train_model, start, metrics, save


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
