"""Decoding tokens/s with fast decoding off (plain cached path) and on (static cache + CUDA graph), as JSON and a table.

    python benchmarks/bench_fast_decode.py                     # GPU: softmax anchor, gated_deltanet at 1k / 32k
    python benchmarks/bench_fast_decode.py --precision fp32    # GPU: the exact check, tokens_match_off must be 1.000
    python benchmarks/bench_fast_decode.py --modes off,graph,compile --json out/fast_decode.json
    python benchmarks/bench_fast_decode.py --smoke             # tiny CPU run: checks the script and token equality

Cases: `softmax` is the issue's anchor, TransformerWrapper(num_tokens=256) over Decoder(dim=512, depth=6, heads=8,
rotary_pos_emb=True), batch 8, prompt 128, 512 new tokens; `gdn-1k` / `gdn-32k` the same stack with every block a
gated_deltanet mixer, 256 new tokens after a 1k / 32k token prompt. bf16 autocast by default (--precision).

Greedy decoding, so every mode should emit the plain path's tokens: `tokens_match_off` is the fraction equal to the
plain path's. In fp32 it must be 1.0. In half precision two kernels that round differently (the static cache attends
over a masked buffer, the plain path over exactly the keys so far) can flip an argmax where the two best logits tie
in bf16, and a flipped row then continues differently, so one flip costs the rest of its row. Where rows differ,
`divergence_gaps` gives, for each such row at its first differing token, the gap between the logits of the plain
path's token and of this mode's token (from one full forward over the plain path's output, same precision), next to
`logit_spacing`, the bf16 spacing at that logit size: gaps of zero or one spacing are ties, not a wrong step.

Timing: CUDA events around whole `generate` calls, best of --repeats after --warmup calls (the first fast call
captures the graph): `tokens_per_s` includes the prefill (the issue's anchor), `decode_tokens_per_s` / `ms_per_step`
subtract a `generate(..., 1)` call (prefill alone), which is what must not depend on the context length for the
linear mixers.
"""

import argparse
import json
import sys
import time

import torch

CASES = dict(
    softmax=dict(decoder=dict(dim=512, depth=6, heads=8, rotary_pos_emb=True), prompt_len=128, new_tokens=512),
    **{
        f"gdn-{name}": dict(
            decoder=dict(dim=512, depth=6, heads=8, linear_attn="gated_deltanet"), prompt_len=length, new_tokens=256
        )
        for name, length in (("1k", 1024), ("32k", 32768))
    },
)

SMOKE = dict(decoder=dict(dim=32, depth=2, heads=4, rotary_pos_emb=True), prompt_len=8, new_tokens=16)


def timed(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - begin


@torch.no_grad()
def measure(case: dict, modes, batch, precision, device, warmup, repeats, seed=0):
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    torch.manual_seed(seed)
    prompt_len, new_tokens = case["prompt_len"], case["new_tokens"]
    decoder = Decoder(**case["decoder"])
    net = TransformerWrapper(num_tokens=256, max_seq_len=prompt_len + new_tokens, attn_layers=decoder)
    model = AutoregressiveWrapper(net).to(device).eval()
    # bf16 weights, or fp32 weights under bf16 autocast (the anchor setting)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    prompts = torch.randint(0, 256, (batch, prompt_len), device=device)

    results, reference = [], None
    for mode in modes:
        fast_decode = False if mode == "off" else mode

        def generate(num_tokens=new_tokens):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast"):
                return model.generate(prompts, num_tokens, temperature=0.0, cache_kv=True, fast_decode=fast_decode)

        for _ in range(warmup):
            generate()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, prefill_seconds = [], []
        for _ in range(repeats):
            out, elapsed = timed(generate, device)
            seconds.append(elapsed)
            # one new token is the prefill (and first sample) alone: the rest of the time is decoding proper
            prefill_seconds.append(timed(lambda: generate(1), device)[1])
        reference = out if reference is None else reference
        best, prefill = min(seconds), min(prefill_seconds)
        gaps, spacing = divergence_gaps(model, prompts, reference, out, precision, device)
        results.append(dict(
            mode=mode,
            tokens_per_s=batch * new_tokens / best,
            decode_tokens_per_s=batch * (new_tokens - 1) / max(best - prefill, 1e-9),
            ms_per_step=(best - prefill) / max(new_tokens - 1, 1) * 1e3,
            prefill_seconds=prefill,
            seconds=seconds,
            peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            # fraction of greedy tokens equal to the plain path's: 1.0 in fp32; in bf16 any two kernel choices may
            # flip a near-tie argmax somewhere, after which a row's continuation differs
            tokens_match_off=(out == reference).float().mean().item() if out.shape == reference.shape else 0.0,
            rows_diverged=len(gaps),
            divergence_gaps=gaps,
            logit_spacing=spacing,
        ))
    return results


@torch.no_grad()
def divergence_gaps(model, prompts, reference, out, precision, device):
    """For each row where `out` leaves the plain path's `reference`: logit(reference token) - logit(out token) at
    the first differing position, from a full forward over the reference; and the bf16 spacing of those logits."""
    if out.shape != reference.shape or torch.equal(out, reference):
        return [], None
    rows = (out != reference).any(dim=-1).nonzero()[:, 0]
    first = (out[rows] != reference[rows]).int().argmax(dim=-1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast"):
        # logits at column n + t - 1 predict new token t
        logits = model.net(torch.cat((prompts, reference), dim=-1)[rows])[:, prompts.shape[-1] - 1 :].float()
    picked = logits[torch.arange(len(rows), device=device), first]  # (rows, num_tokens)
    ref_tokens, out_tokens = reference[rows, first], out[rows, first]
    gaps = picked.gather(-1, ref_tokens[:, None]) - picked.gather(-1, out_tokens[:, None])
    # bf16 keeps 8 significant bits: neighbouring values at magnitude m are 2 ** (floor(log2 m) - 7) apart
    size = picked.gather(-1, ref_tokens[:, None]).abs().amax().clamp(min=1e-6)
    return gaps[:, 0].tolist(), float(2 ** (torch.floor(torch.log2(size)) - 7))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma separated, of {', '.join(CASES)}")
    p.add_argument("--modes", default="off,graph", help="comma separated, of off, eager, graph, compile")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="autocast", choices=("autocast", "bf16", "fp32"),
                   help="bf16 autocast over fp32 weights (as the issue's anchors), bf16 weights, or fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, modes off and eager")
    args = p.parse_args(argv)

    if args.smoke:
        device, precision, modes = torch.device("cpu"), "fp32", ["off", "eager"]
        cases, args.batch, args.warmup, args.repeats = dict(smoke=SMOKE), 2, 1, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or pass --smoke)")
        device, precision, modes = torch.device("cuda"), args.precision, args.modes.split(",")
        cases = {name: CASES[name] for name in args.cases.split(",")}

    report = dict(
        benchmark="fast_decode",
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        precision=precision,
        batch=args.batch,
        cases=[],
    )
    for name, case in cases.items():
        results = measure(case, modes, args.batch, precision, device, args.warmup, args.repeats)
        report["cases"].append(dict(case=name, **case, results=results))

    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)

    print(
        f"\n{'case':10} {'mode':8} {'tokens/s':>10} {'decode t/s':>11} {'ms/step':>8} {'speedup':>8} {'same':>5} "
        f"{'max gap at divergence':>22}"
    )
    for case in report["cases"]:
        base = case["results"][0]["tokens_per_s"]
        for r in case["results"]:
            print(
                f"{case['case']:10} {r['mode']:8} {r['tokens_per_s']:10.0f} {r['decode_tokens_per_s']:11.0f} "
                f"{r['ms_per_step']:8.3f} {r['tokens_per_s'] / base:7.2f}x {r['tokens_match_off']:5.3f} "
                + (f"{max(map(abs, r['divergence_gaps'])):10.4f} (bf16 step {r['logit_spacing']:.4f})"
                   if r["divergence_gaps"] else f"{'-':>22}")
            )
    return report


if __name__ == "__main__":
    main()
