"""One entry point for the benchmarks: runs a suite, writes its one current results file, and regenerates the README
tables from the results files.

    python benchmarks/run.py ops                        # kernel table: our ops vs causal SDPA (and fla when importable)
    python benchmarks/run.py train --peer-path DIR      # training tokens/s, ours vs the x-transformers in DIR
    python benchmarks/run.py decode --peer-path DIR     # generation tokens/s, same peer
    python benchmarks/run.py all --peer-path DIR        # the three suites, then the tables
    python benchmarks/run.py tables                     # README tables from benchmarks/results/*.json only
    python benchmarks/run.py train --smoke              # tiny CPU run of a suite: checks the plumbing, writes nothing

`--peer-path` is a folder holding the peer's `x_transformers` package (e.g. an unpacked x-transformers wheel); the
peer runs the same measurement in a subprocess with that folder first on its path. `--peer-name` labels it.

Each suite overwrites `benchmarks/results/<suite>.json` with its rows, the device, the torch / Triton versions and
the command, and the README block between `<!-- results:<suite> -->` and `<!-- /results:<suite> -->` is rewritten from
it, so every figure in the Performance section comes from the latest run of the command printed beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
sys.path.insert(0, str(HERE))

OPS = "sdpa,chunk_simple_gla,chunk_gla,chunk_delta_rule,chunk_gated_delta_rule,chunk_hgrn"
SEQLENS = "1024,2048,4096,8192,16384,32768"
# fla's counterparts of the scalar-decay and gated delta-rule ops (each fla op adds about a minute of compilation)
FLA_OPS = "chunk_simple_gla,chunk_gated_delta_rule"

# (label, bench_train flags, whether the peer runs the same flags): the enwik8 model (dim 512, depth 6, 8 heads,
# rotary), batch 16 x 1024 unless the flags say otherwise
TRAIN = [
    ("softmax, eager", [], True),
    ("softmax, torch.compile", ["--compile"], True),
    ("softmax, CUDA graph", ["--cuda-graph"], False),
    ("softmax, 2 x 8192, CUDA graph", ["--cuda-graph", "--seq-len", "8192", "--batch", "2"], False),
    ("gated_deltanet, CUDA graph", ["--cuda-graph", "--linear-attn", "gated_deltanet"], False),
    ("gated_deltanet, 2 x 8192, CUDA graph",
     ["--cuda-graph", "--linear-attn", "gated_deltanet", "--seq-len", "8192", "--batch", "2"], False),
]

# (label, bench_decode flags, whether the peer runs them): batch 8, prompt 128, 512 new tokens, greedy, bf16 autocast;
# ours decodes on the fast path where it covers the model (the default on CUDA)
DECODE = [
    ("softmax", [], True),
    ("softmax, batch 1", ["--batch", "1"], True),
    ("softmax, plain cached loop", ["--generate-kwargs", '{"fast_decode": false}'], False),
    ("softmax, ALiBi", ["--config", '{"alibi_pos_bias": true, "rotary_pos_emb": false}'], False),
    ("softmax, shift tokens", ["--config", '{"shift_tokens": 1}'], False),
    ("softmax, sandwich norm", ["--config", '{"sandwich_norm": true}'], False),
    ("softmax, mixture of experts", ["--config", '{"ff_num_experts": 8}'], False),
    ("gated_deltanet, 1k prompt + 256", ["--linear-attn", "gated_deltanet", "--prompt-len", "1024", "--new-tokens",
                                         "256"], False),
]


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, triton=triton_version)


def peer_flags(args) -> list[str]:
    return ["--upstream-path", args.peer_path] if args.peer_path else []


def run_configs(script, configs, args, fixed: list[str]) -> list[dict]:
    """Each config through `script.main` in this process (the peer in a subprocess); a failing config becomes a row
    with its error, so one OOM or unsupported flag does not lose the rest of the run."""
    rows = []
    for label, flags, with_peer in configs:
        argv = [*fixed, *flags, *(peer_flags(args) if with_peer else [])]
        if args.smoke:
            # the CPU check of the plumbing: CUDA graphs need a GPU
            argv = [a for a in argv if a != "--cuda-graph" or torch.cuda.is_available()] + ["--smoke"]
        print(f"=== {label}: {' '.join(argv)}", file=sys.stderr, flush=True)
        try:
            results = script.main(argv)
        except Exception as e:  # noqa: BLE001 - recorded in the results file, shown in the table
            traceback.print_exc()
            rows.append(dict(case=label, flags=flags, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
        for r in results:
            impl = "ours" if r["label"] == "ours" else args.peer_name
            rows.append(dict(case=label, flags=flags, impl=impl, **{k: v for k, v in r.items() if k != "label"}))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def suite_ops(args) -> list[dict]:
    import bench_ops

    argv = ["--seqlens", SEQLENS, "--warmup", "3", "--reps", "10", "--ops", OPS, "--fla-ops", FLA_OPS]
    return bench_ops.main(argv + (["--smoke"] if args.smoke else []))


def suite_train(args) -> list[dict]:
    import bench_train

    return run_configs(bench_train, TRAIN, args, [])


def suite_decode(args) -> list[dict]:
    import bench_decode

    return run_configs(bench_decode, DECODE, args, [])


SUITES = dict(ops=suite_ops, train=suite_train, decode=suite_decode)


# ---------------------------------------------------------------- tables


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def table_ops(res: dict) -> str:
    rows = [r for r in res["rows"] if "T" in r]
    shapes = sorted({(r["B"], r["T"]) for r in rows}, key=lambda s: s[1])
    names = {"torch": "causal SDPA", "ours": "ours", "fla": "fla"}
    lines = ["| op | impl | " + " | ".join(f"{b} x {t}" for b, t in shapes) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in shapes) + " |"]
    for op, impl in dict.fromkeys((r["op"], r["impl"]) for r in rows):
        cells = []
        for b, t in shapes:
            r = next((r for r in rows if (r["op"], r["impl"], r["B"], r["T"]) == (op, impl, b, t)), None)
            if r is None:
                cells.append("")
            elif "error" in r and "fwd_ms" not in r:
                cells.append("error")
            else:
                bwd = f" / {fmt(r['fwd_bwd_ms'])}" if "fwd_bwd_ms" in r else " / error" if "error" in r else ""
                cells.append(f"{fmt(r['fwd_ms'])}{bwd}")
        lines.append(f"| `{op}` | {names.get(impl, impl)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_throughput(res: dict, metric: str, unit: str, extra: list[tuple[str, str, int]]) -> str:
    """One row per config: ours, the peer where it ran, the ratio, and the extra columns (ours)."""
    peer = next((r["impl"] for r in res["rows"] if r.get("impl") not in (None, "ours")), None)
    head = ["model", f"ours ({unit})"] + ([f"{peer} ({unit})", "ours / peer"] if peer else [])
    head += [name for name, _, _ in extra]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for case in dict.fromkeys(r["case"] for r in res["rows"]):
        rows = {r.get("impl"): r for r in res["rows"] if r["case"] == case}
        ours, other = rows.get("ours"), rows.get(peer)
        if ours is None:
            error = next(iter(rows.values())).get("error", "")
            lines.append(f"| {case} | error: {error} |" + " |" * (len(head) - 2))
            continue
        cells = [case, f"{ours[metric]:,.0f}"]
        if peer:
            cells += [f"{other[metric]:,.0f}", f"{ours[metric] / other[metric]:.2f}x"] if other else ["", ""]
        cells += [fmt(ours.get(key), digits) for _, key, digits in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES = dict(
    ops=table_ops,
    train=lambda res: table_throughput(res, "tokens_per_s", "tokens/s",
                                       [("step (ms)", "step_ms", 1), ("peak memory (GB)", "peak_memory_gb", 2)]),
    decode=lambda res: table_throughput(res, "tokens_per_s", "tokens/s",
                                        [("ms / token", "ms_per_token", 2),
                                         ("greedy tokens = plain path", "greedy_match_with_plain_path", 3)]),
)


def render(suite: str, res: dict) -> str:
    env = res["environment"]
    return (f"Measured on one {env['device']} (torch {env['torch']}, Triton {env['triton']}) with "
            f"`{res['command']}`:\n\n{TABLES[suite](res)}")


def update_readme():
    text = README.read_text()
    for suite in SUITES:
        path = RESULTS / f"{suite}.json"
        begin, end = f"<!-- results:{suite} -->", f"<!-- /results:{suite} -->"
        if not path.exists() or begin not in text:
            continue
        block = f"{begin}\n{render(suite, json.loads(path.read_text()))}\n{end}"
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    README.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=[*SUITES, "all", "tables"])
    p.add_argument("--peer-path", default=None, help="folder holding the peer's `x_transformers` package")
    p.add_argument("--peer-name", default="x-transformers", help="the peer's name in the tables")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; prints, writes no results file")
    args = p.parse_args(argv)
    if args.peer_path and not (Path(args.peer_path) / "x_transformers" / "__init__.py").is_file():
        p.error(f"--peer-path {args.peer_path}: no x_transformers package there")

    suites = list(SUITES) if args.suite == "all" else [] if args.suite == "tables" else [args.suite]
    command = shlex.join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    for suite in suites:
        res = dict(suite=suite, command=command, environment=environment(), rows=SUITES[suite](args))
        if args.smoke:
            print(TABLES[suite](res))
            continue
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{suite}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(render(suite, res))
    if not args.smoke:
        update_readme()


if __name__ == "__main__":
    main()
