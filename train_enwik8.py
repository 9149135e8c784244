"""Byte-level language model on enwik8 (or the bundled Shakespeare corpus), the classic x-transformers toy run.

    python train_enwik8.py                                   # classic setup, GPU if present (compiled there)
    python train_enwik8.py --num-batches 60 --batch-size 4 --grad-accum 1 --seq-len 128 --out-dir out
    python train_enwik8.py --out-dir out --resume            # continue from out/checkpoint.pt
    python train_enwik8.py --pack                            # documents (split on blank lines) never see each other
    python generate.py --checkpoint out/checkpoint.pt --prompt "ROMEO:"   # sample from the checkpoint
    torchrun --nproc_per_node 2 train_enwik8.py [--fsdp]     # multi-GPU (or 2 CPU ranks over gloo)

--data reads plain text and .gz, .bz2, .xz or .zst files (.zst needs: pip install zstandard).

On a GPU the step is compiled (--step-mode auto), falling back to a CUDA graph of the eager step and then to eager
with a warning if one fails; Adam is fused and autocast bf16. The progress bar shows tokens/s and the model FLOP
utilization (MFU); the last lines give their averages.

The checkpoint describes its run: model configuration, data file and checksum, arguments. --resume continues that
run with its own arguments: flags left out keep the stored values; --num-batches, --lr, --clip and the
validation, logging and sampling flags may be given anew (each change is logged), and --batch-size with --grad-accum
at the same product (the same sequences per step); a flag that would change the model, the data or the sequences per
step is refused, naming it. A new run refuses to replace a checkpoint unless --overwrite.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from x_transformers import training as T
from x_transformers.mixers import MIXERS

ENWIK8 = Path("data/enwik8.gz")
BUNDLED = Path(__file__).resolve().parent / "data" / "shakespeare.txt.gz"
METRICS = ["step", "train_loss", "val_loss", "val_bpc", "tokens_per_s", "lr"]

# flags a resumed run may take anew: they change neither the model, nor the data, nor the batches drawn
CHANGEABLE = {"num_batches", "lr", "clip", "validate_every", "log_every", "val_batches", "generate_every",
              "generate_length", "prime_length"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=T.HelpFormatter)
    p.add_argument("--data", default=None,
                   help="text file, plain or .gz / .bz2 / .xz / .zst (default: data/enwik8.gz when present, else the "
                        "bundled Shakespeare corpus; on --resume, the run's own file)")
    p.add_argument("--train-bytes", type=T.positive_int, default=int(90e6),
                   help="training split size (enwik8: 90M / 5M); a file no longer than this is split 90%% / 10%%")
    p.add_argument("--val-bytes", type=T.positive_int, default=int(5e6), help="validation split size")
    p.add_argument("--num-batches", type=T.positive_int, default=int(1e5),
                   help="optimizer steps in all (a resumed run trains up to this step)")
    # 16 sequences of 1024 bytes per step, as in the classic run; in one micro-batch, which a GPU runs fastest
    p.add_argument("--batch-size", type=T.positive_int, default=16, help="sequences per micro-batch (per rank)")
    p.add_argument("--grad-accum", type=T.positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=T.positive_int, default=1024, help="training window in bytes (max_seq_len)")
    p.add_argument("--lr", type=T.positive_float, default=1e-4, help="Adam learning rate")
    p.add_argument("--clip", type=T.positive_float, default=0.5, help="gradient norm clip")
    p.add_argument("--dim", type=T.positive_int, default=512, help="model width")
    p.add_argument("--depth", type=T.positive_int, default=6, help="layers")
    p.add_argument("--heads", type=T.positive_int, default=8, help="attention heads")
    p.add_argument("--linear-attn", default=None, choices=sorted(MIXERS), metavar="MIXER",
                   help="linear-attention / RNN mixer instead of softmax attention: " + ", ".join(sorted(MIXERS)))
    p.add_argument("--hybrid-pattern", default=None,
                   help="mixer (L) / softmax (N) tiling over the layers, e.g. LLLN (with --linear-attn)")
    p.add_argument("--config", default=None, help="JSON object of extra Decoder keywords, or a path to one")
    p.add_argument("--validate-every", type=T.positive_int, default=100,
                   help="steps between validations, loss plots and checkpoints")
    p.add_argument("--log-every", type=T.positive_int, default=10,
                   help="steps between reads of the training loss (each read waits for the GPU)")
    p.add_argument("--val-batches", type=T.positive_int, default=1,
                   help="batches averaged per validation, each of --batch-size x --grad-accum sequences")
    p.add_argument("--generate-every", type=T.positive_int, default=500, help="steps between printed samples")
    p.add_argument("--generate-length", type=T.positive_int, default=512, help="bytes per printed sample")
    p.add_argument("--prime-length", type=T.positive_int, default=128,
                   help="prompt length for printed samples (at most --seq-len)")
    p.add_argument("--out-dir", default="out", help="folder for checkpoint.pt, metrics.csv and loss.png")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even though OUT already holds one (its outputs are removed)")
    T.add_step_args(p, peak_tflops=True)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 fully_shard instead of DDP")
    p.add_argument("--fsdp-keep-params", action="store_true",
                   help="with --fsdp: keep each layer's gathered weights from forward to backward (one all-gather per "
                        "layer and micro-batch instead of two; unsharded weights in memory)")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(T.DTYPES),
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--pack", action="store_true",
                   help="packed documents: the corpus is split into documents on --doc-separator, each training row "
                        "(a fixed-size window) holds several that never attend to, mix with or predict each other")
    p.add_argument("--doc-separator", default="\n\n", type=lambda s: s.encode().decode("unicode_escape"),
                   help="with --pack: the text that ends a document (backslash escapes allowed; default a blank line)")
    p.add_argument("--seed", type=T.non_negative_int, default=42, help="seeds weights, data order and samples")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def decoder_kwargs(args) -> dict:
    """Decoder kwargs: the classic ones, the mixer flags when given, then --config on top."""
    kwargs = dict(dim=args.dim, depth=args.depth, heads=args.heads)
    if args.linear_attn is not None:
        kwargs["linear_attn"] = args.linear_attn
    if args.hybrid_pattern is not None:
        kwargs["hybrid_pattern"] = args.hybrid_pattern
    extra = T.parse_json_config(args.config, "Decoder") if args.config else {}
    merged = {**kwargs, **extra}
    has_softmax = (merged.get("linear_attn") is None or "N" in (merged.get("hybrid_pattern") or "")
                   or bool(merged.get("softmax_attn_layers")))
    # rotary positions for the softmax layers; a stack of mixers alone takes no positions at all (its recurrence
    # orders the tokens), so no absolute embedding either, and it decodes past --seq-len
    kwargs.update(rotary_pos_emb=True) if has_softmax else kwargs.update(disable_abs_pos_emb=True)
    kwargs.update(extra)
    return kwargs


def model_config(args) -> dict:
    """What the checkpoint stores to rebuild the model (T.build_model) without this script."""
    return dict(model="decoder", num_tokens=256, max_seq_len=args.seq_len, decoder=decoder_kwargs(args), task="bytes")


def corpus_path(run) -> Path:
    """--data when given; on --resume the run's own file; else enwik8 when present, else the bundled corpus."""
    args = run.args
    if "data" in run.given:
        return Path(args.data)
    if run.state is not None:
        stored = (run.state.get("data") or {}).get("path") or run.state.get("args", {}).get("data")
        if stored:
            if not Path(stored).exists():
                raise T.DataError(f"--resume: the run's data file {stored} is gone; pass --data with a copy of it")
            return Path(stored)
    if ENWIK8.exists():
        return ENWIK8
    run.notes.append(f"{ENWIK8} not found: training on the bundled Shakespeare corpus ({BUNDLED.name}, "
                     "see data/README.md)")
    return BUNDLED


def load_corpus(run):
    """(path, train split, validation split, {path, sha256, bytes}); every problem is a UsageError."""
    args = run.args
    path = corpus_path(run)
    raw = T.read_bytes(path, max_bytes=args.train_bytes + args.val_bytes)
    data = T.bytes_tensor(raw)
    if len(data) > args.train_bytes:
        train, val = T.split_bytes(data, train_bytes=args.train_bytes)
    else:
        # corpora smaller than the enwik8 split: first 90% to train, the rest to validate
        train, val = T.split_bytes(data, val_fraction=0.1)
    T.check_windows({"training": train, "validation": val}, args.seq_len + 1, f"--data {path}")
    info = dict(path=str(path.resolve()), sha256=T.sha256(raw), bytes=len(raw))
    args.data = info["path"]  # the checkpoint's arguments name the file actually read
    return path, train, val, info


def main(argv=None):
    # every check (flags, data, model configuration, the run being resumed) before anything is built
    run = T.parse_run_args(build_parser(), argv, CHANGEABLE, checked_elsewhere=("data",), config_keywords="Decoder")
    args = run.args
    try:
        path, train_data, val_data, data_info = load_corpus(run)
        config = model_config(args)
        T.check_model_config(config)
    except T.UsageError as error:
        run.error(str(error))
    run.check_data(data_info)
    run.check_stored("config", config, "model configuration")
    run.refuse_conflicts()

    dist_info, device, dtype, out, generators = T.start_run(args, write=tqdm.write, notes=run.notes)
    data_gen, val_gen = generators["train"], generators["val"]
    logger.info(f"data {path}: {len(train_data):,} train / {len(val_data):,} val bytes")

    model = T.build_model(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {n_params / 1e6:.2f}M parameters, device {device}, autocast {dtype}, "
                f"world {dist_info.world_size}")
    modes = T.step_modes(args.step_mode, device, dist_info)
    if args.pack and args.step_mode == "auto" and modes != ["eager"]:
        # each packed batch has its own documents (offsets read on the host): no fixed graph to compile or capture
        modes = ["eager"]
        logger.info("--pack: eager steps (every batch packs different documents)")
    flops_per_token = T.flops_per_token(model, args.seq_len)
    peak = T.peak_flops(device, dtype, args.peak_tflops)
    logger.info(f"training step: {' -> '.join(modes)} (--step-mode {args.step_mode}); "
                f"{flops_per_token / 1e6:,.1f} MFLOPs per token"
                + (f", peak {peak / 1e12:,.4g} TFLOP/s per device" if peak else ", no MFU (no peak FLOP/s known)"))

    # generation and validation run on the plain module (DDP hooks and compilation are for training only)
    try:
        model, optimizer, plain, train_step, start, metrics, save = T.prepare_run(
            model, args, out, generators, METRICS, dist_info, device, loss_fn=lm_loss, dtype=dtype, modes=modes,
            state=run.state, extra=dict(config=config, data=data_info),
        )
    except T.UsageError as error:
        run.error(str(error))
    if start >= args.num_batches:
        logger.info(f"the checkpoint is at step {start}, --num-batches is {args.num_batches}: nothing to train "
                    "(give a larger --num-batches to continue)")

    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * dist_info.world_size
    peak_all = peak * dist_info.world_size if peak else None
    bar = tqdm(range(start, args.num_batches), initial=start, total=args.num_batches, disable=not dist_info.is_main,
               desc="training", dynamic_ncols=True, mininterval=0.5)
    # losses stay on the GPU and are read every --log-every steps (no host sync per step); tokens/s on the bar and
    # in the final log count training steps only, averaged since this run started, without the first steps'
    # compilation or graph capture
    losses = T.StepLosses(dist_info, device, tokens_per_step)
    with T.StopOnSignal() as stop:
        for step in bar:
            model.train()
            batches = [draw_batch(train_data, args, data_gen) for _ in range(args.grad_accum)]
            loss = train_step(batches)

            done = step + 1
            losses.add(done, loss, warmup=train_step.warmup)
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
            bar.set_postfix(throughput(losses.tokens_per_s, flops_per_token, peak_all, loss=f"{train_loss:.3f}"))
            row = dict(step=done, train_loss=train_loss, tokens_per_s=tokens_per_s, lr=lr)
            if validating:
                val_loss = validate(plain, val_data, val_gen, args, device, dtype, dist_info)
                row.update(val_loss=val_loss, val_bpc=T.bits_per_byte(val_loss))
                rate = f", {tokens_per_s:,.0f} tokens/s" if tokens_per_s else ""
                logger.info(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                            f"val bpc {T.bits_per_byte(val_loss):.3f}{rate}")
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
        mfu = T.model_flops_utilization(losses.tokens_per_s, flops_per_token, peak_all)
        untimed = f", the first {losses.warmup_steps} (compilation, warm-up) untimed" if losses.warmup_steps else ""
        logger.info(f"average {losses.tokens_per_s:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu is not None else "")
                    + f" over {losses.train_tokens:,} training tokens (step mode {train_step.mode}{untimed})")
    if device.type == "cuda":
        logger.info(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB per rank (rank 0)")
    logger.info(f"outputs in {out}: {T.written_outputs(out)}")
    T.finish(dist_info)


def draw_batch(data, args, generator) -> tuple:
    """One micro-batch of random windows of --seq-len + 1 bytes; with --pack also their in-document positions."""
    windows = T.random_crops(data, args.batch_size, args.seq_len + 1, generator)
    if not args.pack:
        return (windows,)
    return windows, T.document_positions(windows, args.doc_separator.encode())


def lm_loss(module, x, positions=None):
    if positions is None:
        return module(x)
    # packed rows: position ids that restart at 0 describe the documents to the model, and the first token of each
    # document is not a target (it does not follow from the document before)
    _, (logits, intermediates) = module(x, return_outputs=True, pos=positions[:, :-1])
    loss = F.cross_entropy(logits.transpose(1, 2).float(), T.packed_targets(x, positions), ignore_index=-100)
    aux_loss = getattr(intermediates, "aux_loss", None)
    return loss + aux_loss if aux_loss is not None else loss


def throughput(tokens_per_s, flops_per_token, peak, **postfix) -> dict:
    """The progress bar's fields: tokens/s and MFU once a timed step has been read (no MFU without a peak)."""
    if tokens_per_s > 0:
        postfix["tok_s"] = f"{tokens_per_s:,.0f}"
        mfu = T.model_flops_utilization(tokens_per_s, flops_per_token, peak)
        if mfu is not None:
            postfix["mfu"] = f"{mfu:.1%}"
    return postfix


@torch.no_grad()
def validate(model, val_data, val_gen, args, device, dtype, dist_info) -> float:
    model.eval()
    losses = []
    # batches of one step's sequences (in micro-batches): a resumed run that trades --batch-size for --grad-accum at
    # the same product validates on the same sequences
    for _ in range(args.val_batches * args.grad_accum):
        batch = [t.to(device) for t in draw_batch(val_data, args, val_gen)]
        with T.autocast(device, dtype):
            losses.append(lm_loss(model, *batch).item())
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
