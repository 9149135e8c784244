"""Sample text from a checkpoint of train_enwik8.py, or decode a copy with a checkpoint of train_copy.py.

    python generate.py --checkpoint out/checkpoint.pt --prompt "ROMEO:" --length 256
    python generate.py --prompt-file prompt.txt --temperature 0.8 --top-k 20 --seed 0 --num-samples 3
    python generate.py --checkpoint out_copy/checkpoint.pt --prompt "3 5 7 9 2 4"

The model is rebuilt from the configuration stored in the checkpoint (softmax, any mixer or hybrid): no training
flags are needed. The text streams to stdout as it is decoded, the prompt first, one complete UTF-8 character at a
time (the model works on bytes: a byte sequence that is not UTF-8 prints as U+FFFD, control characters other than
newline and tab as spaces). Log lines go to stderr.

Sampling: the --top-k, --top-p and --min-p filters, in that order, then --temperature; --temperature 0 is greedy
decoding (the filters then change nothing, so they are refused). --seed makes a run repeatable.

Context: the model was trained on windows of max_seq_len bytes (the training --seq-len). With rotary positions, as
train_enwik8.py builds, a longer prompt is cut to its last max_seq_len bytes, and decoding past max_seq_len slides a
window: attention layers see the last max_seq_len bytes, mixer layers carry their recurrent state from everything
before. With absolute positions (--config '{"rotary_pos_emb": false}') nothing slides: the prompt plus --length
may read at most max_seq_len positions, else the command is refused.

Decoding always uses the key / value and recurrent-state cache. --fast-decode auto takes the static-cache decoder
(x_transformers.fast_decode, a CUDA graph per token) on CUDA when the model supports it and the text fits in
max_seq_len, and the plain cached path otherwise; on forces the static-cache decoder (eager on CPU) or says why it
cannot; off never uses it. Both give the same tokens for greedy decoding.

Copy checkpoints (train_copy.py): --prompt (or --prompt-file) is the source sequence, symbol ids separated by spaces
or commas, each from 2 to num_symbols + 1, at most the training --seq-len of them (the model saw exactly that many);
without a prompt a random source is drawn. The decoded copy streams as ids, then is checked against the source.
--length does not apply: a copy is as long as its source.
"""

import argparse
import codecs
import os
import re
import sys
from functools import partial

import torch
from loguru import logger

from x_transformers import training as T
from x_transformers.autoregressive_wrapper import min_p, top_k, top_p, trim_cached_kv
from x_transformers.fast_decode import fast_decoder_for, sample_next, supports

# tokens decoded per replay batch of the CUDA-graph decoder: one per host read would idle the GPU
GRAPH_CHUNK = 32
RULE = "-" * 80


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=T.HelpFormatter)
    p.add_argument("--checkpoint", default="out/checkpoint.pt",
                   help="checkpoint.pt written by train_enwik8.py or train_copy.py")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text to continue (copy checkpoints: the source symbol ids)")
    prompt.add_argument("--prompt-file", default=None,
                        help="file holding the prompt, plain or .gz / .bz2 / .xz / .zst, used byte for byte")
    p.add_argument("--length", type=T.positive_int, default=256, help="bytes to generate per sample")
    p.add_argument("--num-samples", type=T.positive_int, default=1, help="samples, one after the other")
    p.add_argument("--temperature", type=T.non_negative_float, default=1.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=T.positive_int, default=None, help="sample among the k likeliest tokens (default: off)")
    p.add_argument("--top-p", type=T.fraction, default=None,
                   help="nucleus sampling: among the likeliest tokens whose probabilities sum past p (default: off)")
    p.add_argument("--min-p", type=T.fraction, default=None,
                   help="drop tokens less likely than min-p times the likeliest one (default: off)")
    p.add_argument("--seed", type=T.non_negative_int, default=None,
                   help="seed for repeatable samples (default: different samples each run)")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(T.DTYPES),
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--fast-decode", default="auto", choices=("auto", "on", "off"),
                   help="the static-cache decoder: auto (CUDA, when supported), on (or say why not), off")
    return p


# sampling, as AutoregressiveWrapper.generate does it


def make_filter(args):
    """The sampling filters asked for, chained: top-k, then top-p, then min-p (the library's own functions)."""
    steps = []
    if args.top_k is not None:
        steps.append(partial(top_k, k=args.top_k))
    if args.top_p is not None:
        steps.append(partial(top_p, thres=args.top_p))
    if args.min_p is not None:
        steps.append(partial(min_p, min_p=args.min_p))

    def filter_logits(logits):
        for step in steps:
            logits = step(logits)
        return logits

    return filter_logits


def plain_sampler(temperature: float, filter_fn):
    """(b, num_tokens) logits -> (b, 1) tokens, drawing from the global RNG exactly as the plain path of
    AutoregressiveWrapper.generate does: the same seed gives the same text."""

    def pick(logits):
        if temperature == 0.0:
            return logits.argmax(dim=-1, keepdim=True)
        probs = (filter_fn(logits) / temperature).softmax(dim=-1)
        return torch.multinomial(probs, 1)

    return pick


# decoding loops that hand each new token over as soon as it exists


@torch.no_grad()
def stream_plain(wrapper, prompt, length: int, pick, emit, **net_kwargs):
    """The cached decoding loop of AutoregressiveWrapper.generate (its sliding window past max_seq_len included),
    driven here so that `emit` sees each (b, 1) token as it is drawn."""
    net, max_len = wrapper.net, wrapper.max_seq_len
    out, cache = prompt, None
    for _ in range(length):
        x = out
        if out.shape[-1] > max_len:
            # the last max_len tokens, and the cached keys / values of all but the newest of them
            x = out[:, -max_len:]
            if cache is not None:
                cache = trim_cached_kv(cache, max_len - 1)
        logits, new_cache = net(x, return_intermediates=True, cache=cache, seq_start_pos=None, **net_kwargs)
        if net.can_cache_kv:
            cache = new_cache
        token = pick(logits[:, -1])
        out = torch.cat((out, token), dim=-1)
        emit(token)


@torch.no_grad()
def stream_fast(wrapper, prompt, length: int, temperature: float, filter_fn, emit, mode: str, **net_kwargs):
    """The static-cache decoder (x_transformers.fast_decode) stepped in chunks: prefill, first token, then
    `run_steps`, reading the new tokens from its sequence buffer after each chunk - FastDecoder.generate's steps,
    with the tokens handed out as they come."""
    n = prompt.shape[-1]
    decoder = fast_decoder_for(wrapper, prompt.shape[0], n + length, mode)
    decoder.set_sampler(temperature, filter_fn, {}, None)
    logits = decoder.prefill(prompt, None, **net_kwargs)
    token = sample_next(logits, temperature, filter_fn, {})
    decoder.seq[:, n : n + 1].copy_(token)
    decoder.tokens.copy_(token)
    emit(token)
    chunk = GRAPH_CHUNK if mode == "graph" else 1
    done = 1
    while done < length:
        steps = min(chunk, length - done)
        decoder.run_steps(steps)
        emit(decoder.seq[:, n + done : n + done + steps])
        done += steps


def fast_mode(args, wrapper, read_len: int, device) -> str | None:
    """Which decoder to use: a FastDecoder mode, or None for the plain cached path. `read_len` is the number of
    positions the model reads (prompt + length - 1): the static cache does not slide past max_seq_len."""
    if args.fast_decode == "off":
        return None
    ok, reason = supports(wrapper.net)
    fits = read_len <= wrapper.max_seq_len
    if args.fast_decode == "on":
        if not ok:
            raise T.UsageError(f"--fast-decode on: {reason}")
        if not fits:
            raise T.UsageError(f"--fast-decode on: the static-cache decoder does not slide past max_seq_len "
                               f"({wrapper.max_seq_len}), and the prompt and --length read {read_len} positions; "
                               "use --fast-decode off or auto, or a shorter --length")
        return "graph" if device.type == "cuda" else "eager"
    return "graph" if device.type == "cuda" and ok and fits else None


def decode(args, wrapper, prompt, length: int, filter_fn, emit, mode: str | None, **net_kwargs):
    if mode is None:
        stream_plain(wrapper, prompt, length, plain_sampler(args.temperature, filter_fn), emit, **net_kwargs)
    else:
        stream_fast(wrapper, prompt, length, args.temperature, filter_fn, emit, mode, **net_kwargs)


class TextStream:
    """Bytes in, text out as soon as each UTF-8 character is complete."""

    def __init__(self, out):
        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write_bytes(self, values):
        self.write(self.decoder.decode(bytes(values)))

    def finish(self):
        self.write(self.decoder.decode(b"", final=True))
        self.decoder.reset()

    def write(self, text: str):
        if text:
            self.out.write(T.printable(text))
            self.out.flush()


# the two kinds of checkpoint


def load_model(args):
    """(model, config, step) from --checkpoint; every problem is a UsageError naming the file."""
    path = args.checkpoint
    state = T.load_checkpoint(path)
    config = state.get("config")
    if config is None:
        raise T.UsageError(f"{path} records no model configuration, so the model cannot be rebuilt from it; "
                           "continuing it with the training script's --resume (one more step) writes one")
    try:
        model = T.build_model(config)
    except Exception as error:
        raise T.UsageError(f"{path}: its model configuration does not build a model: {T.one_line(error)}") from None
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise T.UsageError(f"{path}: its weights do not fit its model configuration: {T.one_line(error)}") from None
    return model, config, state["step"]


def lm_prompt(args) -> bytes:
    if args.prompt is not None:
        # surrogateescape gives back the very bytes of a command-line argument that is not valid UTF-8
        data = args.prompt.encode("utf-8", errors="surrogateescape")
    elif args.prompt_file is not None:
        data = T.read_bytes(args.prompt_file, what="--prompt-file")
    else:
        raise T.UsageError("give the text to continue: --prompt TEXT or --prompt-file PATH")
    if not data:
        raise T.UsageError("the prompt is empty: the model needs at least one byte to continue")
    return data


def copy_source(args, config) -> list[int] | None:
    """The source symbols given as --prompt / --prompt-file, or None to draw them."""
    if args.prompt is not None:
        text, source = args.prompt, "--prompt"
    elif args.prompt_file is not None:
        text, source = T.read_bytes(args.prompt_file, what="--prompt-file").decode("utf-8", errors="replace"), "--prompt-file"
    else:
        return None
    low, high, seq_len = 2, config["num_symbols"] + 1, config["seq_len"]
    items = [item for item in re.split(r"[\s,\[\]]+", text) if item]
    if not items:
        raise T.UsageError(f"{source} is empty: give the source sequence as symbol ids, e.g. {low} {low + 1} {high}")
    symbols = []
    for item in items:
        if not re.fullmatch(r"[+-]?\d+", item):
            raise T.UsageError(f"{source}: {item!r} is not a symbol id; the copy model takes whole numbers from {low} "
                               f"to {high}, separated by spaces or commas")
        symbols.append(int(item))
    outside = [s for s in symbols if not low <= s <= high]
    if outside:
        raise T.UsageError(f"{source}: symbol {outside[0]} is outside {low} .. {high}, the "
                           f"{config['num_symbols']} symbols the model was trained on")
    if len(symbols) > seq_len:
        raise T.UsageError(f"{source} has {len(symbols)} symbols; the model copies at most {seq_len} "
                           "(its training --seq-len)")
    return symbols


def generate_text(args, model, config, filter_fn, device, dtype, out):
    wrapper = model
    net = wrapper.net
    prompt = lm_prompt(args)
    n, max_len = len(prompt), wrapper.max_seq_len
    if not net.can_cache_kv_outside_max_seq_len:  # absolute positions: nothing past max_seq_len exists
        if n > max_len:
            raise T.UsageError(f"the prompt is {n} bytes, longer than the model's context: its absolute positions "
                               f"reach {max_len} (the training --seq-len)")
        if n + args.length - 1 > max_len:
            raise T.UsageError(f"the prompt ({n} bytes) and --length {args.length} read {n + args.length - 1} "
                               f"positions, past the model's absolute positions ({max_len}); use --length "
                               f"{max_len - n + 1} or less")
    elif n > max_len:
        logger.info(f"the prompt is {n} bytes: the model reads its last {max_len} (its training window)")

    mode = fast_mode(args, wrapper, n + args.length - 1, device)
    tokens = torch.tensor(list(prompt), dtype=torch.long, device=device)[None]
    echo = T.printable(prompt.decode("utf-8", errors="replace"))
    stream = TextStream(out)
    for index in range(args.num_samples):
        if index:
            out.write(f"{RULE}\n")
        stream.write(echo)
        with T.autocast(device, dtype):
            decode(args, wrapper, tokens, args.length, filter_fn, lambda t: stream.write_bytes(t[0].tolist()), mode)
        stream.finish()
        out.write("\n")
        out.flush()


def generate_copy(args, model, config, filter_fn, device, dtype, out, given):
    if "length" in given:
        raise T.UsageError("--length does not apply to a copy checkpoint: the copy is as long as its source")
    symbols = copy_source(args, config)
    if symbols is None:
        generator = torch.Generator()
        if args.seed is not None:
            generator.manual_seed(args.seed)
        else:
            generator.seed()
        symbols = torch.randint(2, config["num_symbols"] + 2, (config["seq_len"],), generator=generator).tolist()
    src = torch.tensor(symbols, device=device)[None]
    mask = torch.ones_like(src, dtype=torch.bool)
    start = torch.full((1, 1), config["start_token"], device=device)
    mode = fast_mode(args, model.decoder, len(symbols), device)
    out.write("source:" + "".join(f" {s}" for s in symbols) + "\n")
    for _ in range(args.num_samples):
        decoded = []

        def emit(token):
            decoded.extend(token[0].tolist())
            out.write("".join(f" {t}" for t in token[0].tolist()))
            out.flush()

        out.write("copy:  ")
        with torch.no_grad(), T.autocast(device, dtype):
            encodings = model.encoder(src, mask=mask, return_embeddings=True)
            decode(args, model.decoder, start, len(symbols), filter_fn, emit, mode, context=encodings,
                   context_mask=mask)
        correct = sum(a == b for a, b in zip(decoded, symbols))
        out.write(f"\ncorrect: {correct} of {len(symbols)} symbols\n")
        out.flush()


def main(argv=None, out=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = T.explicit_args(parser, argv)
    out = out if out is not None else sys.stdout
    if hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a traceback
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="{message}")

    try:
        T.check_device(args.device)
        if args.temperature == 0:
            filters = [T.flag_name(name) for name in ("top_k", "top_p", "min_p") if getattr(args, name) is not None]
            if filters:
                raise T.UsageError(f"{', '.join(filters)} with --temperature 0: greedy decoding takes the likeliest "
                                   "token, which every filter keeps; drop the filter or sample with a temperature")
        model, config, step = load_model(args)
        task = config.get("task")
        if task not in ("bytes", "copy"):
            raise T.UsageError(f"{args.checkpoint}: a model for task {task!r}; generate.py reads the byte-level "
                               "language model of train_enwik8.py and the copy model of train_copy.py")
        vocab = config["num_tokens"] if task == "bytes" else config["kwargs"]["dec_num_tokens"]
        if args.top_k is not None and args.top_k > vocab:
            raise T.UsageError(f"--top-k {args.top_k} is more than the model's {vocab} tokens")
    except T.UsageError as error:
        parser.error(str(error))

    device = T.pick_device(args.device)
    dtype = T.pick_dtype(args.dtype, device)
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{args.checkpoint}: step {step}, {n_params / 1e6:.2f}M parameters, device {device}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    filter_fn = make_filter(args)
    try:
        if task == "bytes":
            generate_text(args, model, config, filter_fn, device, dtype, out)
        else:
            generate_copy(args, model, config, filter_fn, device, dtype, out, given)
    except T.UsageError as error:
        parser.error(str(error))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, and keep Python from failing to flush stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
