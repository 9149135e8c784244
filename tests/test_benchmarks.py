"""benchmarks/run.py: suites write one results file each, and the README tables are regenerated from those files."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "README", tmp_path / "README.md")
    return module


def train_result(peer_tokens_per_s=400_000.0):
    rows = [
        dict(case="softmax, eager", flags=[], impl="ours", tokens_per_s=800_000.0, step_ms=20.5, peak_memory_gb=2.4),
        dict(case="softmax, eager", flags=[], impl="x-transformers 2.31.10", tokens_per_s=peer_tokens_per_s,
             step_ms=41.0, peak_memory_gb=3.0),
        dict(case="gated_deltanet, CUDA graph", flags=["--cuda-graph"], error="RuntimeError: out of memory"),
    ]
    env = dict(device="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0")
    return dict(suite="train", command="python benchmarks/run.py train --peer-path peer", environment=env, rows=rows)


def test_train_table_has_the_peer_ratio_and_the_error(run):
    table = run.TABLES["train"](train_result())
    lines = table.splitlines()
    assert lines[0].startswith("| model | ours (tokens/s) | x-transformers 2.31.10 (tokens/s) | ours / peer |")
    assert "| softmax, eager | 800,000 | 400,000 | 2.00x | 20.5 | 2.40 |" in lines
    assert any(line.startswith("| gated_deltanet, CUDA graph | error: RuntimeError: out of memory") for line in lines)


def test_ops_table_puts_fwd_and_fwd_bwd_per_shape(run):
    rows = [
        dict(op="sdpa", impl="torch", B=16, T=1024, fwd_ms=0.15, fwd_bwd_ms=0.69),
        dict(op="sdpa", impl="torch", B=4, T=4096, fwd_ms=0.47, fwd_bwd_ms=1.87),
        dict(op="chunk_gla", impl="ours", B=16, T=1024, fwd_ms=0.63, fwd_bwd_ms=1.78),
        dict(op="chunk_gla", impl="fla", B=16, T=1024, fwd_ms=0.70, error="backward refused"),
    ]
    table = run.TABLES["ops"](dict(rows=rows)).splitlines()
    assert table[0] == "| op | impl | 16 x 1024 | 4 x 4096 |"
    assert "| `sdpa` | causal SDPA | 0.15 / 0.69 | 0.47 / 1.87 |" in table
    assert "| `chunk_gla` | ours | 0.63 / 1.78 |  |" in table
    assert "| `chunk_gla` | fla | 0.70 / error |  |" in table


def test_tables_rewrite_only_the_marked_blocks(run):
    run.RESULTS.mkdir()
    (run.RESULTS / "train.json").write_text(json.dumps(train_result()))
    run.README.write_text("intro\n<!-- results:train -->\nold table\n<!-- /results:train -->\noutro\n"
                          "<!-- results:decode -->\nkept: no results file\n<!-- /results:decode -->\n")
    run.main(["tables"])
    text = run.README.read_text()
    assert "old table" not in text and "kept: no results file" in text
    assert text.startswith("intro\n<!-- results:train -->\nMeasured on one NVIDIA H100 80GB HBM3 (torch 2.11.0, "
                           "Triton 3.6.0) with `python benchmarks/run.py train --peer-path peer`:")
    assert "| softmax, eager | 800,000 | 400,000 | 2.00x |" in text
    assert text.endswith("\n<!-- /results:train -->\noutro\n<!-- results:decode -->\nkept: no results file\n"
                         "<!-- /results:decode -->\n")
    # a second pass over the same results changes nothing
    run.main(["tables"])
    assert run.README.read_text() == text


def test_smoke_suite_runs_each_config_and_writes_nothing(run, monkeypatch, capsys):
    monkeypatch.setattr(run, "DECODE", [("softmax", [], False), ("bad flag", ["--config", '{"no_such_flag": 1}'], False)])
    run.main(["decode", "--smoke"])
    out = capsys.readouterr().out
    assert "| softmax |" in out
    assert "| bad flag | error: TypeError" in out and "no_such_flag" in out
    assert not run.RESULTS.exists()


def test_peer_path_must_hold_the_package(run, tmp_path):
    with pytest.raises(SystemExit) as e:
        run.main(["train", "--peer-path", str(tmp_path)])
    assert e.value.code == 2
