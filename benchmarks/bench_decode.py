"""Decoding throughput with the KV cache: new tokens/s over the batch, and peak memory, as JSON and a table.

    python benchmarks/bench_decode.py                                 # anchor: batch 8, prompt 128, 512 new tokens
    python benchmarks/bench_decode.py --prompt-len 32768 --linear-attn gated_deltanet --new-tokens 256
    python benchmarks/bench_decode.py --generate-kwargs '{"temperature": 1.0}'
    python benchmarks/bench_decode.py --upstream-python /path/to/env/bin/python
    python benchmarks/bench_decode.py --smoke

Greedy decoding (temperature 0) by default. Where generate() has a `fast_decode` switch (ours: on by default on CUDA),
the greedy output is also compared with the plain path (`fast_decode=False`); the table shows the fraction of tokens
that match (1 = identical). `--generate-kwargs '{"fast_decode": false}'` times the plain path itself.
"""

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402
    Timer,
    add_common_args,
    autocast,
    decoder_kwargs,
    environment,
    finish_args,
    peak_memory_gb,
    report,
    reset_peak_memory,
    run_upstream,
    setup,
)


@torch.no_grad()
def measure(args) -> dict:
    device, dtype, xt = setup(args)
    max_seq_len = args.prompt_len + args.new_tokens
    net = xt.TransformerWrapper(num_tokens=256, max_seq_len=max_seq_len, attn_layers=xt.Decoder(**decoder_kwargs(args)))
    model = xt.AutoregressiveWrapper(net).to(device).eval()
    if args.compile:
        model.net = torch.compile(model.net, dynamic=True)
    prompts = torch.randint(0, 256, (args.batch, args.prompt_len), device=device)
    gen_kwargs = dict(temperature=0.0, cache_kv=True)
    gen_kwargs.update(json.loads(args.generate_kwargs) if args.generate_kwargs else {})

    def generate():
        with autocast(device, dtype):
            return model.generate(prompts, args.new_tokens, **gen_kwargs)

    for _ in range(args.warmup):
        generate()
    reset_peak_memory(device)
    seconds = []
    for _ in range(args.repeats):
        with Timer(device) as timer:
            out = generate()
        seconds.append(timer.seconds)
    best = min(seconds)

    # fast decoding (ours: preallocated cache, CUDA graphs) must emit exactly what the plain cached path does
    matches_plain = None
    fast = "fast_decode" in inspect.signature(model.generate).parameters and "fast_decode" not in gen_kwargs
    if args.check and fast and gen_kwargs["temperature"] == 0.0:
        with autocast(device, dtype):
            plain = model.generate(prompts, args.new_tokens, **gen_kwargs, fast_decode=False)
        matches_plain = (plain == out).float().mean().item()
    return dict(
        benchmark="decode",
        label=args.label,
        config=dict(decoder=decoder_kwargs(args), batch=args.batch, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, generate=gen_kwargs, compile=args.compile,
                    dtype=str(dtype).removeprefix("torch."), repeats=args.repeats, warmup=args.warmup),
        tokens_per_s=args.batch * args.new_tokens / best,
        ms_per_token=best / args.new_tokens * 1e3,
        seconds=seconds,
        peak_memory_gb=peak_memory_gb(device),
        output_shape=list(out.shape),
        greedy_match_with_plain_path=matches_plain,
        **environment(device, xt),
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed generate calls (the best is reported)")
    p.add_argument("--generate-kwargs", default=None, help="JSON object of extra generate() kwargs")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing greedy output with the plain (fast_decode=False) path")
    args = p.parse_args(argv)
    smoke = dict(dim=64, depth=2, heads=2, batch=2, prompt_len=16, new_tokens=8, repeats=1, warmup=1, device="cpu")
    args = finish_args(args, dict(batch=8, prompt_len=128, new_tokens=512, repeats=3, warmup=1), smoke)

    results = [measure(args)]
    if args.upstream_python or args.upstream_path:
        results.append(run_upstream(args, argv, script=Path(__file__).resolve()))
    report(results, "tokens_per_s", ["tokens_per_s", "ms_per_token", "peak_memory_gb", "greedy_match_with_plain_path"],
           args)
    return results


if __name__ == "__main__":
    main()
