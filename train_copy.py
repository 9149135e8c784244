"""Encoder-decoder copy task: an XTransformer learns to output its random input sequence.

Small enough to reach 100% copy accuracy on a laptop CPU within the default run (it stops there).

    python train_copy.py --out-dir out_copy
    python train_copy.py --out-dir out_copy --resume
    python generate.py --checkpoint out_copy/checkpoint.pt --prompt "3 5 7 9"   # decode a copy
    torchrun --nproc_per_node 2 train_copy.py --out-dir out_copy

--resume continues the run stored in OUT/checkpoint.pt with its own arguments: flags left out keep the stored
values; --num-batches, --lr, --clip, --target-acc and the validation, logging and printing flags may be given anew
(each change is logged), and --batch-size with --grad-accum at the same product; a flag that would change the model
or the sequences per step is refused, naming it. A new run refuses to replace a checkpoint unless --overwrite.

On one GPU the step is captured as a CUDA graph (--step-mode auto), falling back to eager with a warning if that fails.
"""

import argparse

import torch
from loguru import logger
from tqdm import tqdm

from x_transformers import training as T
from x_transformers.mixers import MIXERS

METRICS = ["step", "train_loss", "token_acc", "seq_acc", "tokens_per_s", "lr"]
START = 1  # decoder start token; 0 is left for padding, symbols are 2 .. num_tokens-1

# on one GPU: a model this small waits on kernel launches, which a CUDA graph of the step removes with one capture,
# without compiling, whose cost a run this short would not win back
AUTO_STEP_MODES = ("graph", "eager")

# flags a resumed run may take anew: they change neither the model nor the batches drawn
CHANGEABLE = {"num_batches", "lr", "clip", "validate_every", "log_every", "val_size", "generate_every", "target_acc"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=T.HelpFormatter)
    p.add_argument("--num-batches", type=T.positive_int, default=1500,
                   help="optimizer steps in all (stops early at --target-acc)")
    p.add_argument("--batch-size", type=T.positive_int, default=32, help="sequences per micro-batch (per rank)")
    p.add_argument("--grad-accum", type=T.positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=T.positive_int, default=16, help="length of the sequence to copy")
    p.add_argument("--num-symbols", type=T.positive_int, default=16, help="distinct symbols in the sequences")
    p.add_argument("--lr", type=T.positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--clip", type=T.positive_float, default=1.0, help="gradient norm clip")
    p.add_argument("--dim", type=T.positive_int, default=128, help="model width")
    p.add_argument("--depth", type=T.positive_int, default=2, help="encoder and decoder depth")
    p.add_argument("--heads", type=T.positive_int, default=4, help="attention heads")
    p.add_argument("--linear-attn", default=None, choices=sorted(MIXERS), metavar="MIXER",
                   help="linear-attention / RNN mixer for the decoder's self-attention: " + ", ".join(sorted(MIXERS)))
    p.add_argument("--hybrid-pattern", default=None, help="mixer (L) / softmax (N) tiling, e.g. LN (with --linear-attn)")
    p.add_argument("--config", default=None,
                   help="JSON object of extra XTransformer keywords (enc_ / dec_ prefixed), or a path to one")
    p.add_argument("--validate-every", type=T.positive_int, default=50,
                   help="steps between accuracy checks and checkpoints")
    p.add_argument("--log-every", type=T.positive_int, default=10,
                   help="steps between reads of the training loss (each read waits for the GPU)")
    p.add_argument("--val-size", type=T.positive_int, default=64, help="sequences decoded per accuracy check")
    p.add_argument("--generate-every", type=T.positive_int, default=250, help="steps between printed examples")
    p.add_argument("--target-acc", type=T.fraction, default=1.0, help="stop once sequence accuracy reaches this")
    p.add_argument("--out-dir", default="out_copy", help="folder for checkpoint.pt, metrics.csv and loss.png")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even though OUT already holds one (its outputs are removed)")
    T.add_step_args(p, auto=AUTO_STEP_MODES)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 fully_shard instead of DDP")
    p.add_argument("--fsdp-keep-params", action="store_true",
                   help="with --fsdp: keep each layer's gathered weights from forward to backward (one all-gather per "
                        "layer and micro-batch instead of two; unsharded weights in memory)")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(T.DTYPES),
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=T.non_negative_int, default=42, help="seeds weights and the sequences drawn")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def model_kwargs(args) -> dict:
    num_tokens = args.num_symbols + 2
    kwargs = dict(
        dim=args.dim,
        tie_token_emb=True,
        enc_num_tokens=num_tokens,
        enc_depth=args.depth,
        enc_heads=args.heads,
        enc_max_seq_len=args.seq_len,
        dec_num_tokens=num_tokens,
        dec_depth=args.depth,
        dec_heads=args.heads,
        dec_max_seq_len=args.seq_len + 1,
    )
    if args.linear_attn is not None:
        kwargs["dec_linear_attn"] = args.linear_attn
    if args.hybrid_pattern is not None:
        kwargs["dec_hybrid_pattern"] = args.hybrid_pattern
    if args.config:
        kwargs.update(T.parse_json_config(args.config, "XTransformer"))
    return kwargs


def model_config(args) -> dict:
    """What the checkpoint stores to rebuild the model (T.build_model) and read its tokens (generate.py)."""
    return dict(model="xtransformer", kwargs=model_kwargs(args), task="copy", start_token=START,
                num_symbols=args.num_symbols, seq_len=args.seq_len)


def make_batch(args, batch_size, generator, device):
    """src: random symbols; tgt: the start token followed by src."""
    src = torch.randint(2, args.num_symbols + 2, (batch_size, args.seq_len), generator=generator)
    tgt = torch.cat((torch.full((batch_size, 1), START), src), dim=1)
    mask = torch.ones_like(src, dtype=torch.bool)
    return src.to(device), tgt.to(device), mask.to(device)


def main(argv=None):
    # every check (flags, model configuration, the run being resumed) before anything is built
    run = T.parse_run_args(build_parser(), argv, CHANGEABLE, config_keywords="XTransformer")
    args = run.args
    config = model_config(args)
    try:
        T.check_model_config(config)
    except T.UsageError as error:
        run.error(str(error))
    run.check_stored("config", config, "model configuration")
    run.refuse_conflicts()

    dist_info, device, dtype, out, generators = T.start_run(args, write=tqdm.write, notes=run.notes)
    data_gen, val_gen = generators["train"], generators["val"]

    model = T.build_model(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"copy task: {args.seq_len} symbols from {args.num_symbols}; model {n_params / 1e6:.2f}M parameters, "
                f"device {device}, autocast {dtype}, world {dist_info.world_size}")

    modes = T.step_modes(args.step_mode, device, dist_info, auto=AUTO_STEP_MODES)
    logger.info(f"training step: {' -> '.join(modes)} (--step-mode {args.step_mode})")

    # generation and validation run on the plain module (DDP hooks and compilation are for training only)
    try:
        model, optimizer, plain, train_step, start, metrics, save = T.prepare_run(
            model, args, out, generators, METRICS, dist_info, device, loss_fn=copy_loss, dtype=dtype, modes=modes,
            state=run.state, extra=dict(config=config),
        )
    except T.UsageError as error:
        run.error(str(error))
    if start >= args.num_batches:
        logger.info(f"the checkpoint is at step {start}, --num-batches is {args.num_batches}: nothing to train "
                    "(give a larger --num-batches to continue)")

    tokens_per_step = args.batch_size * args.grad_accum * (2 * args.seq_len + 1) * dist_info.world_size
    bar = tqdm(range(start, args.num_batches), initial=start, total=args.num_batches, disable=not dist_info.is_main,
               desc="copy", dynamic_ncols=True, mininterval=0.5)
    # losses stay on the GPU and are read every --log-every steps (no host sync per step)
    losses = T.StepLosses(dist_info, device, tokens_per_step)
    seq_acc = None
    with T.StopOnSignal() as stop:
        for step in bar:
            model.train()
            # drawn on the host: the training step moves them to the device without waiting for it
            batches = [make_batch(args, args.batch_size, data_gen, torch.device("cpu")) for _ in range(args.grad_accum)]
            loss = train_step(batches)

            done = step + 1
            losses.add(done, loss, warmup=train_step.warmup)
            last = done == args.num_batches
            evaluate = done % args.validate_every == 0 or last
            # all ranks log at the same steps (a collective); a single process also at once when interrupted
            if not (done % args.log_every == 0 or evaluate or (stop.requested and not dist_info.enabled)):
                continue

            lr = optimizer.param_groups[0]["lr"]
            *earlier, (_, train_loss, tokens_per_s) = losses.flush()
            for s, loss_s, tps in earlier:
                metrics.log(step=s, train_loss=loss_s, tokens_per_s=tps, lr=lr)
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=seq_acc, tok_s=f"{losses.tokens_per_s:,.0f}")
            row = dict(step=done, train_loss=train_loss, tokens_per_s=tokens_per_s, lr=lr)
            if evaluate:
                show = done % args.generate_every == 0 or last
                token_acc, seq_acc = accuracy(plain, args, val_gen, device, dtype, dist_info, show=show)
                row.update(token_acc=token_acc, seq_acc=seq_acc)
                logger.info(f"step {done}: loss {train_loss:.4f}, copy accuracy {token_acc:.2%} of tokens, "
                            f"{seq_acc:.2%} of sequences")
            metrics.log(**row)
            reached = evaluate and seq_acc >= args.target_acc
            if evaluate:
                if dist_info.is_main:
                    T.plot_metrics(out / "metrics.csv", out / "loss.png", {"train_loss": "train loss"},
                                   title="copy task", ylabel="cross-entropy", logy=True)
                save(done)
            if reached:
                logger.info(f"reached {seq_acc:.0%} sequence accuracy at step {done}")
                break
            if T.any_rank(stop.requested, dist_info, device):
                if not evaluate:
                    save(done)
                logger.warning(f"stopped at step {done}: checkpoint in {out / 'checkpoint.pt'}, continue with --resume")
                break
            losses.resume()
    bar.close()
    if losses.train_time > 0:
        untimed = f", the first {losses.warmup_steps} (compilation, warm-up) untimed" if losses.warmup_steps else ""
        logger.info(f"average {losses.tokens_per_s:,.0f} tokens/s over {losses.train_tokens:,} training tokens "
                    f"(step mode {train_step.mode}{untimed})")
    logger.info(f"outputs in {out}: {T.written_outputs(out)}")
    T.finish(dist_info)


def copy_loss(module, src, tgt, mask):
    return module(src, tgt, mask=mask)


@torch.no_grad()
def accuracy(model, args, val_gen, device, dtype, dist_info, show=False):
    """Greedy-decode fresh sequences; returns (token accuracy, whole-sequence accuracy), averaged over ranks."""
    model.eval()
    src, _, mask = make_batch(args, args.val_size, val_gen, device)
    start = torch.full((args.val_size, 1), START, device=device)
    with T.autocast(device, dtype), T.root_gathered(model):
        pred = model.generate(src, start, args.seq_len, mask=mask, temperature=0.0)
    correct = pred == src
    token_acc = T.all_reduce_mean(correct.float().mean().item(), dist_info, device)
    seq_acc = T.all_reduce_mean(correct.all(dim=-1).float().mean().item(), dist_info, device)
    if show and dist_info.is_main:
        tqdm.write(f"input:     {src[0].tolist()}\npredicted: {pred[0].tolist()}\n"
                   f"incorrect: {(~correct[0]).sum().item()} of {args.seq_len}")
    return token_acc, seq_acc


if __name__ == "__main__":
    main()
