"""Byte-level language model on enwik8 (or the bundled Shakespeare corpus), the classic x-transformers toy run.

    python train_enwik8.py                                   # classic setup, GPU if present
    python train_enwik8.py --num-batches 60 --batch-size 4 --grad-accum 1 --seq-len 128 --out-dir out
    python train_enwik8.py --out-dir out --resume            # continue from out/checkpoint.pt
    torchrun --nproc_per_node 2 train_enwik8.py [--fsdp]     # multi-GPU (or 2 CPU ranks over gloo)
"""

import argparse
import json
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers import training as T

ENWIK8 = Path("data/enwik8.gz")
BUNDLED = Path(__file__).resolve().parent / "data" / "shakespeare.txt.gz"
METRICS = ["step", "train_loss", "val_loss", "val_bpc", "tokens_per_s", "lr"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a .gz or text file (default: data/enwik8.gz, else the bundled corpus)")
    p.add_argument("--train-bytes", type=int, default=int(90e6), help="training split size (enwik8: 90M / 5M)")
    p.add_argument("--val-bytes", type=int, default=int(5e6))
    p.add_argument("--num-batches", type=int, default=int(1e5), help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (per rank)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=0.5, help="gradient norm clip")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--linear-attn", default=None, help="linear-attention mixer name, e.g. gated_deltanet")
    p.add_argument("--hybrid-pattern", default=None, help="mixer / softmax tiling, e.g. LLLN (with --linear-attn)")
    p.add_argument("--config", default=None, help="JSON object of extra Decoder kwargs, or a path to one")
    p.add_argument("--validate-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between reads of the training loss (each read waits for the GPU)")
    p.add_argument("--val-batches", type=int, default=1, help="micro-batches averaged per validation")
    p.add_argument("--generate-every", type=int, default=500)
    p.add_argument("--generate-length", type=int, default=512)
    p.add_argument("--prime-length", type=int, default=128, help="prompt length for sample generations")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's model")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 fully_shard instead of DDP")
    p.add_argument("--fsdp-keep-params", action="store_true",
                   help="with --fsdp: keep each layer's gathered weights from forward to backward (one all-gather per "
                        "layer and micro-batch instead of two; unsharded weights in memory)")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="autocast dtype: bf16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def decoder_kwargs(args) -> dict:
    """Decoder kwargs: the classic ones, the mixer flags when given, then --config on top."""
    kwargs = dict(dim=args.dim, depth=args.depth, heads=args.heads, rotary_pos_emb=True)
    if args.linear_attn is not None:
        kwargs["linear_attn"] = args.linear_attn
    if args.hybrid_pattern is not None:
        kwargs["hybrid_pattern"] = args.hybrid_pattern
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        extra = json.loads(text)
        if not isinstance(extra, dict):
            raise ValueError(f"--config must be a JSON object of Decoder kwargs, got {type(extra).__name__}")
        kwargs.update(extra)
    return kwargs


def load_corpus(args):
    if args.data is not None:
        path = Path(args.data)
    elif ENWIK8.exists():
        path = ENWIK8
    else:
        path = BUNDLED
        logger.info(f"{ENWIK8} not found: training on the bundled Shakespeare corpus ({path.name}, see data/README.md)")
    data = T.load_bytes(path, max_bytes=args.train_bytes + args.val_bytes)
    if len(data) > args.train_bytes:
        return path, *T.split_bytes(data, train_bytes=args.train_bytes)
    # corpora smaller than the enwik8 split: first 90% to train, the rest to validate
    return path, *T.split_bytes(data, val_fraction=0.1)


def main(argv=None):
    args = parse_args(argv)
    dist_info, device, dtype, out, generators = T.start_run(args, write=tqdm.write)
    data_gen, val_gen = generators["train"], generators["val"]

    path, train_data, val_data = load_corpus(args)
    logger.info(f"data {path}: {len(train_data):,} train / {len(val_data):,} val bytes")

    model = TransformerWrapper(num_tokens=256, max_seq_len=args.seq_len, attn_layers=Decoder(**decoder_kwargs(args)))
    model = AutoregressiveWrapper(model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {n_params / 1e6:.2f}M parameters, device {device}, autocast {dtype}, "
                f"world {dist_info.world_size}")

    # generation and validation run on the plain module (DDP hooks are for training only)
    model, optimizer, plain, train_model, start, metrics, save = T.prepare_run(
        model, args, out, generators, METRICS, dist_info, device
    )

    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * dist_info.world_size
    bar = tqdm(range(start, args.num_batches), initial=start, total=args.num_batches, disable=not dist_info.is_main,
               desc="training", dynamic_ncols=True, mininterval=0.5)
    # losses stay on the GPU and are read every --log-every steps (no host sync per step); tokens/s on the bar and
    # in the final log count training steps only, averaged since this run started
    losses = T.StepLosses(dist_info, device, tokens_per_step)
    with T.StopOnSignal() as stop:
        for step in bar:
            model.train()
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                x = T.random_crops(train_data, args.batch_size, args.seq_len + 1, data_gen).to(device)
                # gradients are reduced across ranks only on the last micro-batch of the step
                with T.gradient_sync(model, micro == args.grad_accum - 1):
                    with T.autocast(device, dtype):
                        loss = train_model(x)
                    (loss / args.grad_accum).backward()
                loss_sum += loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            losses.add(done, loss_sum / args.grad_accum)
            last = done == args.num_batches
            validating = done % args.validate_every == 0 or last
            sampling = done % args.generate_every == 0 or last
            # all ranks log at the same steps (a collective); a single process also at once when interrupted
            if not (done % args.log_every == 0 or validating or sampling or (stop.requested and not dist_info.enabled)):
                continue

            lr = optimizer.param_groups[0]["lr"]
            *earlier, (_, train_loss, tokens_per_s) = losses.flush()
            for s, loss_s, tps in earlier:
                metrics.log(step=s, train_loss=loss_s, tokens_per_s=tps, lr=lr)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{losses.tokens_per_s:,.0f}")
            row = dict(step=done, train_loss=train_loss, tokens_per_s=tokens_per_s, lr=lr)
            if validating:
                val_loss = validate(plain, val_data, val_gen, args, device, dtype, dist_info)
                row.update(val_loss=val_loss, val_bpc=T.bits_per_byte(val_loss))
                logger.info(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                            f"val bpc {T.bits_per_byte(val_loss):.3f}, {tokens_per_s:,.0f} tokens/s")
            metrics.log(**row)

            if sampling:
                sample(plain, val_data, done, args, device, dtype, dist_info)
            if validating:
                if dist_info.is_main:
                    T.plot_metrics(out / "metrics.csv", out / "loss.png", {"train_loss": "train", "val_loss": "val"},
                                   title=f"{path.name}: byte-level LM")
                save(done)

            if T.any_rank(stop.requested, dist_info, device):
                if not validating:
                    save(done)
                logger.warning(f"stopped at step {done}: checkpoint in {out / 'checkpoint.pt'}, continue with --resume")
                break
            losses.resume()
    bar.close()
    if losses.train_time > 0:
        logger.info(f"average {losses.tokens_per_s:,.0f} tokens/s over {losses.train_tokens:,} training tokens")
    if device.type == "cuda":
        logger.info(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB per rank (rank 0)")
    logger.info(f"outputs in {out}: checkpoint.pt, metrics.csv, loss.png")
    T.finish(dist_info)


@torch.no_grad()
def validate(model, val_data, val_gen, args, device, dtype, dist_info) -> float:
    model.eval()
    losses = []
    for _ in range(args.val_batches):
        x = T.random_crops(val_data, args.batch_size, args.seq_len + 1, val_gen).to(device)
        with T.autocast(device, dtype):
            losses.append(model(x).item())
    return T.all_reduce_mean(sum(losses) / len(losses), dist_info, device)


@torch.no_grad()
def sample(model, val_data, step, args, device, dtype, dist_info):
    # under FSDP every rank must run the forward passes (parameters are all-gathered); otherwise rank 0 alone
    if not (dist_info.is_main or T.is_fsdp(model)):
        return
    model.eval()
    # own generator and a forked global RNG: sampling never shifts the training or validation streams, so a run
    # that samples at some step (e.g. its last before a --resume) trains exactly like one that does not
    prompt_gen = torch.Generator().manual_seed(args.seed + step)
    prime = T.random_crops(val_data, 1, min(args.prime_length, args.seq_len), prompt_gen)[0].to(device)
    with T.fork_rng(device), T.autocast(device, dtype), T.root_gathered(model):
        out = model.generate(prime[None], args.generate_length, cache_kv=True)
    if dist_info.is_main:
        rule = "-" * 80
        tqdm.write(f"{rule}\nprompt:\n{T.decode_bytes(prime.tolist())}\n{rule}\n"
                   f"generated:\n{T.decode_bytes(out[0].tolist())}\n{rule}")


if __name__ == "__main__":
    main()
