"""Training scripts end to end, as a user runs them: tiny CPU runs as subprocesses and in-process (`main(argv)`),
their usage errors and resume rules, plus unit tests of the shared pieces in x_transformers/training.py."""

import bz2
import csv
import gzip
import importlib.util
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from x_transformers import training as T
from x_transformers.mixers import MIXERS

ROOT = Path(__file__).resolve().parents[1]


def load_script(path):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


enwik8, copy_task = load_script(ROOT / "train_enwik8.py"), load_script(ROOT / "train_copy.py")

# a model small enough for a few dozen CPU steps in seconds
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
        "--lr", "3e-3", "--generate-length", "16", "--prime-length", "8", "--device", "cpu", "--seed", "0"]
TINY_COPY = ["--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "6", "--num-symbols", "4",
             "--batch-size", "16", "--val-size", "8", "--device", "cpu", "--seed", "0"]


def run(script, *args, torchrun=False, timeout=600):  # generous: a loaded 2-core box is slow to start ranks
    cmd = [sys.executable, str(ROOT / script), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def read_metrics(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def losses(rows):
    return {int(r["step"]): float(r["train_loss"]) for r in rows}


def test_enwik8_runs_learns_and_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    log = run("train_enwik8.py", *TINY, "--num-batches", "24", "--validate-every", "12", "--out-dir", str(full))
    assert "bundled Shakespeare corpus" in log
    assert "generated:" in log

    rows = read_metrics(full)
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    loss = losses(rows)
    assert sum(loss[s] for s in range(20, 25)) < sum(loss[s] for s in range(1, 6)) - 0.5, loss
    assert rows[11]["val_loss"] and rows[23]["val_bpc"] and not rows[0]["val_loss"]
    assert (full / "loss.png").stat().st_size > 0
    ckpt = torch.load(full / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 24 and ckpt["args"]["seq_len"] == 32
    assert not list(full.glob("*.tmp*"))

    # 12 steps, then --resume to 24: the same losses as the uninterrupted run
    run("train_enwik8.py", *TINY, "--num-batches", "12", "--validate-every", "12", "--out-dir", str(part))
    log = run("train_enwik8.py", *TINY, "--num-batches", "24", "--validate-every", "12", "--out-dir", str(part),
              "--resume")
    assert "resumed from" in log and "at step 12" in log
    resumed = read_metrics(part)
    assert [int(r["step"]) for r in resumed] == list(range(1, 25))
    for step in range(13, 25):
        assert losses(resumed)[step] == pytest.approx(loss[step], rel=1e-5, abs=1e-6), step
    assert float(resumed[23]["val_loss"]) == pytest.approx(float(rows[23]["val_loss"]), rel=1e-5)


def test_ctrl_c_leaves_loadable_checkpoint(tmp_path):
    # on a hybrid linear-attention model, so the mixer flags are exercised end to end as well
    mixer = ["--linear-attn", "gated_deltanet", "--hybrid-pattern", "LN", "--depth", "2"]
    cmd = [sys.executable, str(ROOT / "train_enwik8.py"), *TINY, *mixer, "--num-batches", "100000",
           "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if (tmp_path / "metrics.csv").exists() and len(read_metrics(tmp_path)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "continue with --resume" in out
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] >= 3 and ckpt["step"] == len(read_metrics(tmp_path))
    assert set(ckpt) >= {"model", "optimizer", "rng", "args"}
    assert ckpt["args"]["linear_attn"] == "gated_deltanet" and ckpt["args"]["hybrid_pattern"] == "LN"


def test_copy_task_learns(tmp_path):
    log = run("train_copy.py", *TINY_COPY, "--num-batches", "40", "--validate-every", "20", "--generate-every", "20",
              "--lr", "3e-3", "--out-dir", str(tmp_path))
    assert "copy accuracy" in log and "predicted:" in log
    rows = read_metrics(tmp_path)
    loss = losses(rows)
    assert loss[max(loss)] < loss[1] - 0.3, loss
    assert rows[19]["token_acc"] and float(rows[-1]["token_acc"]) > 0.3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == len(rows)
    assert (tmp_path / "loss.png").exists()


def test_two_gloo_ranks_ddp_and_fsdp2_agree(tmp_path):
    """torchrun with 2 CPU ranks: DDP, then FSDP2 (fully_shard; also keeping gathered weights from forward to
    backward) on the same data; all resume, and their losses agree step for step (FSDP2 shards parameters but must
    compute the same gradients)."""
    runs = {}
    for name, flags in [("ddp", []), ("fsdp2", ["--fsdp"]), ("fsdp2_keep", ["--fsdp", "--fsdp-keep-params"])]:
        out = tmp_path / name
        args = [*TINY, "--validate-every", "3", "--out-dir", str(out), *flags]
        log = run("train_enwik8.py", *args, "--num-batches", "3", torchrun=True)
        assert "world 2" in log
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2
        # the gathered checkpoint is a full, unsharded state dict
        assert any(k.endswith("token_emb.emb.weight") for k in ckpt["model"])
        assert all(not type(v).__name__.startswith("DTensor") for v in ckpt["model"].values())
        log = run("train_enwik8.py", *args, "--num-batches", "6", "--resume", torchrun=True)
        assert "at step 3" in log
        runs[name] = read_metrics(out)
        assert [int(r["step"]) for r in runs[name]] == list(range(1, 7))
    for name in ("fsdp2", "fsdp2_keep"):
        for ddp_row, fsdp_row in zip(runs["ddp"], runs[name]):
            assert float(fsdp_row["train_loss"]) == pytest.approx(float(ddp_row["train_loss"]), rel=1e-4), name


def test_checkpoints_resume_across_world_sizes(tmp_path):
    """A 2-rank FSDP2 checkpoint resumes in one process, and a one-process checkpoint under 2 DDP ranks: the gathered
    checkpoint is world-size free. After one more step every weight is within one Adam step (lr) of the checkpoint,
    which a run that failed to load (fresh init) would not be."""
    lr = 3e-3  # TINY's learning rate: Adam moves each weight by at most about lr per step
    cases = [("fsdp2_to_1", dict(torchrun=True), ["--fsdp"], dict(torchrun=False), []),
             ("1_to_ddp", dict(torchrun=False), [], dict(torchrun=True), [])]
    for name, first, first_flags, second, second_flags in cases:
        out = tmp_path / name
        args = [*TINY, "--validate-every", "3", "--out-dir", str(out)]
        run("train_enwik8.py", *args, *first_flags, "--num-batches", "3", **first)
        before = torch.load(out / "checkpoint.pt", weights_only=False)
        log = run("train_enwik8.py", *args, *second_flags, "--num-batches", "4", "--resume", **second)
        assert "at step 3" in log and "reseeding" in log
        after = torch.load(out / "checkpoint.pt", weights_only=False)
        assert after["step"] == 4 and len(after["rng"]) == (2 if second["torchrun"] else 1)
        assert before["model"].keys() == after["model"].keys()
        old, new = before["model"], after["model"]
        moved = max((new[k].float() - old[k].float()).abs().max().item() for k in old)
        assert 0 < moved <= lr * 1.05, f"{name}: weights moved {moved:.2e} in one step"
        assert [int(r["step"]) for r in read_metrics(out)] == [1, 2, 3, 4]


# the shared pieces


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "checkpoint.pt"
    T.save_checkpoint(path, {"step": 1})
    T.save_checkpoint(path, {"step": 2})
    assert torch.load(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_metrics_resume_drops_rows_after_checkpoint(tmp_path):
    m = T.Metrics(tmp_path / "m.csv", ["step", "loss"])
    for step in range(1, 6):
        m.log(step=step, loss=1.0 / step)
    m = T.Metrics(tmp_path / "m.csv", ["step", "loss"], resume_step=3)
    m.log(step=4, loss=0.0)
    assert [(r["step"], r["loss"]) for r in m.read()] == [("1", "1"), ("2", "0.5"), ("3", "0.333333"), ("4", "0")]


def test_data_helpers(tmp_path):
    text = tmp_path / "a.txt"
    text.write_bytes("héllo\x01world\n".encode() * 20)
    data = T.load_bytes(text)
    train, val = T.split_bytes(data)
    assert len(train) + len(val) == len(data) and len(val) == len(data) - int(len(data) * 0.9)
    gen = torch.Generator().manual_seed(0)
    batch = T.random_crops(train, 3, 5, gen)
    assert batch.shape == (3, 5) and batch.dtype == torch.long
    assert T.decode_bytes("héllo\x01\n".encode()) == "héllo \n"
    with pytest.raises(ValueError, match="too short"):
        T.random_crops(val, 1, 10_000, gen)
    with pytest.raises(T.DataError, match="does not exist"):
        T.load_bytes(tmp_path / "missing.gz")


def test_cli_passes_mixer_flags_and_config(tmp_path):
    train_enwik8 = enwik8
    args = train_enwik8.parse_args(["--linear-attn", "gated_deltanet", "--hybrid-pattern", "LLLN",
                                    "--config", '{"attn_flash": true, "depth": 2}'])
    kwargs = train_enwik8.decoder_kwargs(args)
    assert kwargs == dict(dim=512, depth=2, heads=8, rotary_pos_emb=True, linear_attn="gated_deltanet",
                          hybrid_pattern="LLLN", attn_flash=True)
    with pytest.raises(ValueError, match="JSON object"):
        train_enwik8.decoder_kwargs(train_enwik8.parse_args(["--config", "[1, 2]"]))
    # a stack of mixers alone has no softmax layer to rotate: no positions at all
    kwargs = train_enwik8.decoder_kwargs(train_enwik8.parse_args(["--linear-attn", "gla"]))
    assert kwargs == dict(dim=512, depth=6, heads=8, linear_attn="gla", disable_abs_pos_emb=True)
    with pytest.raises(ValueError, match="unknown --dtype"):
        T.pick_dtype("fp8", torch.device("cpu"))


def test_benchmarks_smoke(tmp_path, capsys):
    """Both benchmark scripts at tiny CPU sizes: JSON and table out; the side-by-side path re-runs the measurement in
    a subprocess (here with this same interpreter standing in for an upstream environment)."""
    bench_train = load_script(ROOT / "benchmarks" / "bench_train.py")
    results = bench_train.main(["--smoke", "--json", str(tmp_path / "train.json"),
                                "--upstream-python", sys.executable])
    assert [r["label"] for r in results] == ["ours", "upstream"]
    assert all(r["tokens_per_s"] > 0 and r["config"]["seq_len"] == 64 for r in results)
    # same seed and same code: the subprocess measured the same model
    assert results[1]["final_loss"] == pytest.approx(results[0]["final_loss"], rel=1e-5)
    assert "tokens_per_s ratio" in capsys.readouterr().out

    bench_decode = load_script(ROOT / "benchmarks" / "bench_decode.py")
    (result,) = bench_decode.main(["--smoke", "--json", str(tmp_path / "decode.json")])
    assert result["output_shape"] == [2, 8] and result["tokens_per_s"] > 0
    assert result["greedy_match_with_plain_path"] in (None, 1.0)
    saved = __import__("json").loads((tmp_path / "decode.json").read_text())
    assert saved["results"][0]["config"]["prompt_len"] == 16


def test_step_losses_read_back_once_per_log_step():
    losses = T.StepLosses(T.Dist(), torch.device("cpu"), tokens_per_step=100)
    assert losses.flush() == [] and losses.tokens_per_s == 0.0
    for step, value in [(1, 3.0), (2, 2.5), (3, 2.0)]:
        losses.add(step, torch.tensor(value))
    rows = losses.flush()
    assert [(s, v) for s, v, _ in rows] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert len({tps for _, _, tps in rows}) == 1 and rows[0][2] > 0  # the interval's average for each step
    assert losses.train_tokens == 300 and losses.flush() == []
    time.sleep(0.05)
    losses.resume()  # time outside training (validation, checkpoints) does not count
    losses.add(4, torch.tensor(1.0))
    (step, value, tps), = losses.flush()
    assert (step, value) == (4, 1.0) and tps > 100 / 0.05


def test_graphed_train_step_matches_eager_steps():
    """A training step captured as a CUDA graph gives the eager step's losses and weights, step for step (GPU); on
    CPU it refuses with a clear error."""
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    def build():
        torch.manual_seed(0)
        net = TransformerWrapper(num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=32, depth=2, heads=2,
                                                                                        rotary_pos_emb=True))
        return AutoregressiveWrapper(net)

    if not torch.cuda.is_available():
        model = build()
        opt = torch.optim.Adam(model.parameters())
        with pytest.raises(ValueError, match="needs CUDA"):
            T.GraphedTrainStep(model, opt, torch.randint(0, 64, (2, 33)), torch.float32)
        return
    data = torch.randint(0, 64, (8, 4, 33), device="cuda")
    eager, graphed = build().cuda(), build().cuda()
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
    opt_g = torch.optim.Adam(graphed.parameters(), lr=1e-3, capturable=True)
    for _ in range(3):  # the graphed step's warm-up trains on its example batch: match it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager(data[0]).backward()
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
    step = T.GraphedTrainStep(graphed, opt_g, data[0], torch.bfloat16, warmup=3)
    for x in data[1:]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_e = eager(x)
        loss_e.backward()
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        loss_g = step(x)
        torch.testing.assert_close(loss_g, loss_e.detach(), atol=2e-3, rtol=2e-3)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="captured for batches"):
        step(data[0, :2])


# the command line: usage errors, resume rules, data formats (in-process, tiny runs)

TINY_INPROC = ["--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
               "--grad-accum", "1", "--lr", "3e-3", "--validate-every", "2", "--generate-length", "8",
               "--prime-length", "8", "--device", "cpu", "--seed", "0"]
TEXT = b"ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n" * 30


@pytest.fixture
def one_thread():
    # models this small run fastest on one thread; more only contend for a busy CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def call(main, argv):
    main([str(a) for a in argv])


def usage_error(capsys, main, argv) -> str:
    """Run a script's main expecting a usage error: exit status 2 and exactly one error line, returned."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def test_bad_arguments_are_one_line_usage_errors_before_any_model(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_bytes(TEXT)
    (tmp_path / "tiny.txt").write_bytes(b"x" * 40)  # 36 bytes to train, 4 to validate
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "corrupt.gz").write_bytes(gzip.compress(TEXT)[:100])
    out = tmp_path / "out"
    cases = [
        (["--seq-len", "0"], "argument --seq-len: must be at least 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
        (["--validate-every", "0"], "argument --validate-every: must be at least 1"),
        (["--num-batches", "0"], "argument --num-batches: must be at least 1"),
        (["--grad-accum", "-2"], "argument --grad-accum: must be at least 1"),
        (["--seq-len", "ten"], "expected a whole number, got 'ten'"),
        (["--lr", "0"], "argument --lr: must be above 0"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice"),
        (["--hybrid-pattern", "LN"], "need `linear_attn`"),
        (["--config", "[1, 2]"], "--config must be a JSON object of Decoder keywords"),
        (["--config", "{oops"], "--config is not valid JSON"),
        (["--config", "settings.json"], "neither a file nor a JSON object"),
        (["--config", '{"no_such_flag": 1}'], "no_such_flag"),
        (["--data", tmp_path / "missing.txt"], "missing.txt does not exist"),
        (["--data", tmp_path], "is a folder"),
        (["--data", tmp_path / "empty.txt"], "empty.txt is empty"),
        (["--data", tmp_path / "corrupt.gz"], "corrupt.gz cannot be read as gzip data"),
        (["--data", tmp_path / "tiny.txt"], "the validation split has 4 bytes, windows of --seq-len 32 need at least 34"),
        (["--data", data, "--seq-len", "4000"], "the training split has"),
        (["--data", data, "--resume"], "no checkpoint at"),
        (["--data", data, "--resume", "--overwrite"], "give one of them"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for argv, expected in cases:
        assert expected in usage_error(capsys, enwik8.main, [*TINY_INPROC, *argv, "--out-dir", out]), argv
    # an unknown mixer: the message lists the library's mixers
    message = usage_error(capsys, enwik8.main, ["--linear-attn", "transformer", "--out-dir", out])
    assert "invalid choice: 'transformer'" in message and all(name in message for name in MIXERS)
    for argv, expected in [(["--num-symbols", "0"], "--num-symbols: must be at least 1"),
                           (["--target-acc", "1.5"], "--target-acc: must be above 0 and at most 1"),
                           (["--val-size", "0"], "--val-size: must be at least 1"),
                           (["--config", '{"dec_no_such_flag": 1}'], "no_such_flag")]:
        assert expected in usage_error(capsys, copy_task.main, [*argv, "--out-dir", out]), argv
    assert not out.exists()  # refused before anything was built or written


def test_help_shows_defaults_and_mixer_names(capsys):
    for main, default in [(enwik8.main, "(default: 1024)"), (copy_task.main, "(default: 16)")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert default in text and "--overwrite" in text and all(name in text for name in MIXERS)
        assert "(default: None)" not in text and "(default: False)" not in text


def test_resume_applies_or_refuses_changed_arguments(tmp_path, capsys, one_thread):
    data = tmp_path / "text.txt"
    data.write_bytes(TEXT)
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    call(enwik8.main, [*TINY_INPROC, "--data", data, "--num-batches", "2", "--out-dir", out])
    capsys.readouterr()
    state = torch.load(ckpt, weights_only=True)
    assert state["config"] == dict(model="decoder", num_tokens=256, max_seq_len=32, task="bytes",
                                   decoder=dict(dim=32, depth=1, heads=2, rotary_pos_emb=True))
    assert state["data"] == dict(path=str(data.resolve()), sha256=T.sha256(TEXT), bytes=len(TEXT))

    # a new run into the same folder is refused, saying how to go on
    message = usage_error(capsys, enwik8.main, [*TINY_INPROC, "--data", data, "--out-dir", out])
    assert "already holds a training run" in message and "--resume" in message and "--overwrite" in message

    # what would change the model, the data or the batches is refused, naming each conflict
    other = tmp_path / "other.txt"
    other.write_bytes(TEXT.replace(b"ROMEO", b"JULIET"))
    message = usage_error(capsys, enwik8.main, ["--out-dir", out, "--resume", "--dim", "64", "--data", other,
                                                "--batch-size", "8"])
    assert "--dim 32 (given 64)" in message and "--batch-size 4 (given 8)" in message
    assert f"--data {data.resolve()}" in message and f"given {other.resolve()}" in message and "sha256" in message

    # the learning rate and the step count may change: applied, one log line each; the rest comes from the checkpoint
    call(enwik8.main, ["--out-dir", out, "--resume", "--lr", "1e-3", "--num-batches", "4"])
    log = capsys.readouterr().out
    assert "resume: --lr 0.003 -> 0.001" in log and "resume: --num-batches 2 -> 4" in log and "at step 2" in log
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4 and state["args"]["dim"] == 32 and state["args"]["lr"] == 1e-3
    assert all(group["lr"] == 1e-3 for group in state["optimizer"]["param_groups"])

    # the same bytes under another name, compressed: the run goes on, and says so
    moved = tmp_path / "moved.txt.xz"
    moved.write_bytes(lzma.compress(TEXT))
    call(enwik8.main, ["--out-dir", out, "--resume", "--data", moved])
    log = capsys.readouterr().out
    assert "the same bytes" in log and "nothing to train" in log

    # --overwrite starts over
    call(enwik8.main, [*TINY_INPROC, "--data", data, "--num-batches", "2", "--out-dir", out, "--overwrite"])
    assert "--overwrite: removed the earlier run's checkpoint.pt, metrics.csv, loss.png" in capsys.readouterr().out
    assert torch.load(ckpt, weights_only=True)["step"] == 2 and len(read_metrics(out)) == 2

    # a damaged checkpoint is named
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert f"{ckpt} is not a readable checkpoint" in usage_error(capsys, enwik8.main, ["--out-dir", out, "--resume"])


def test_copy_resume_refuses_another_model(tmp_path, capsys, one_thread):
    out = tmp_path / "copy"
    call(copy_task.main, [*TINY_COPY, "--num-batches", "2", "--validate-every", "2", "--out-dir", out])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["task"] == "copy"
    capsys.readouterr()
    message = usage_error(capsys, copy_task.main, ["--out-dir", out, "--resume", "--num-symbols", "5"])
    assert "--num-symbols 4 (given 5)" in message
    call(copy_task.main, ["--out-dir", out, "--resume", "--num-batches", "3", "--target-acc", "0.5"])
    assert "resume: --target-acc 1.0 -> 0.5" in capsys.readouterr().out


def test_closing_line_names_only_files_written(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setattr(T, "plot_metrics", lambda *args, **kwargs: False)  # as without matplotlib
    data = tmp_path / "text.txt"
    data.write_bytes(TEXT)
    call(enwik8.main, [*TINY_INPROC, "--data", data, "--num-batches", "2", "--out-dir", tmp_path / "run"])
    assert f"outputs in {tmp_path / 'run'}: checkpoint.pt, metrics.csv\n" in capsys.readouterr().out
    assert not (tmp_path / "run" / "loss.png").exists()


def test_every_format_reads_the_same_bytes(tmp_path, monkeypatch):
    raw = "héllo wörld, ".encode() * 2000
    files = {
        "a.txt": raw,
        "a.txt.gz": gzip.compress(raw),
        "a.txt.bz2": bz2.compress(raw),
        "a.txt.xz": lzma.compress(raw),
        "compressed_without_suffix": bz2.compress(raw),  # recognised by its first bytes
    }
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:  # two frames, as zstd --long or concatenated files give
        files["a.txt.zst"] = zstandard.ZstdCompressor().compress(raw[:100]) + zstandard.ZstdCompressor().compress(raw[100:])
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        assert T.read_bytes(tmp_path / name) == raw, name
        assert T.read_bytes(tmp_path / name, max_bytes=150) == raw[:150], name
        assert torch.equal(T.load_bytes(tmp_path / name), T.bytes_tensor(raw))
    if zstandard is not None:
        (tmp_path / "cut.zst").write_bytes(files["a.txt.zst"][:40])
        with pytest.raises(T.DataError, match="cut.zst cannot be read as zstd data.*truncated"):
            T.read_bytes(tmp_path / "cut.zst")

    # without the zstandard package: an error that says what to install
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "compression", None)
    (tmp_path / "b.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)
    with pytest.raises(T.DataError, match=r"b.zst: reading .zst files needs the zstandard package: pip install zstandard"):
        T.read_bytes(tmp_path / "b.zst")

    # the benchmark reads through the same reader
    compare = load_script(ROOT / "benchmarks" / "compare_mixers.py")
    train, val = compare.load_bytes(tmp_path / "a.txt.xz")
    assert torch.equal(torch.cat((train, val)), T.bytes_tensor(raw).long())


# the training step: modes, fallback, resume across modes, batch shape, MFU


def test_step_mode_choice_and_flags(tmp_path, capsys):
    cpu, cuda, one, two = torch.device("cpu"), torch.device("cuda"), T.Dist(), T.Dist(0, 2, 0)
    assert T.step_modes("auto", cpu, one) == ["eager"]  # compiling on a CPU costs more than a short run gains
    assert T.step_modes("auto", cuda, one) == ["compile", "graph", "eager"]
    assert T.step_modes("auto", cuda, two) == ["eager"]
    assert T.step_modes("auto", cuda, one, auto=copy_task.AUTO_STEP_MODES) == ["graph", "eager"]
    assert T.step_modes("compile", cpu, one) == ["compile"]  # explicit: no fallback
    assert T.step_modes("eager", cuda, one) == ["eager"]

    args = enwik8.parse_args([])
    assert (args.step_mode, args.compile, args.batch_size, args.grad_accum) == ("auto", False, 16, 1)
    args = enwik8.parse_args(["--compile"])  # the older spelling
    T.check_step_mode(args)
    assert args.step_mode == "compile"

    out = ["--out-dir", tmp_path / "out"]
    message = usage_error(capsys, enwik8.main, [*TINY_INPROC, "--compile", "--step-mode", "eager", *out])
    assert "--compile is --step-mode compile, and --step-mode eager was given too" in message
    message = usage_error(capsys, enwik8.main, [*TINY_INPROC, "--step-mode", "graph", *out])
    assert "--step-mode graph captures the step as a CUDA graph and needs a CUDA device" in message
    message = usage_error(capsys, copy_task.main, [*TINY_COPY, "--step-mode", "graph", *out])
    assert "needs a CUDA device" in message
    assert not (tmp_path / "out").exists()


class _FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated inductor failure in the backward graph")


def test_train_step_falls_back_with_the_same_step(monkeypatch, caplog_loguru):
    """A compiled first step that fails inside backward - after its forward drew dropout masks and some gradients
    were written - falls back to eager on the same micro-batches: one warning, and exactly the weights, losses and
    RNG stream of a run that was eager from the start."""
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    def build():
        torch.manual_seed(0)
        net = TransformerWrapper(num_tokens=64, max_seq_len=16,
                                 attn_layers=Decoder(dim=16, depth=1, heads=2, ff_dropout=0.2, rotary_pos_emb=True))
        return AutoregressiveWrapper(net)

    def fake_compile(model, **kwargs):
        def compiled(x):
            for p in model.parameters():
                p.grad = torch.full_like(p, 7.0)
            return _FailsInBackward.apply(model(x))
        return compiled

    batches = [[(torch.randint(0, 64, (2, 17)),), (torch.randint(0, 64, (2, 17)),)] for _ in range(3)]
    cpu = torch.device("cpu")
    results = []
    for modes in (["compile", "eager"], ["eager"]):
        model = build()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "compile", fake_compile)
            step = T.TrainStep(model, optimizer, lambda module, x: module(x), modes, cpu, torch.float32, clip=0.5)
            step_losses = [step(b) for b in batches]
        assert step.mode == "eager" and step.warmup is False
        results.append((model.state_dict(), step_losses, torch.rand(3)))
    (fell_back, losses_a, rng_a), (eager, losses_b, rng_b) = results
    assert all(torch.equal(fell_back[k], eager[k]) for k in eager)
    assert losses_a == losses_b and torch.equal(rng_a, rng_b)
    warnings = [line for line in caplog_loguru if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "step mode compile failed on its first step (RuntimeError: simulated inductor failure in the backward " \
           "graph); falling back to eager" in warnings[0]

    # an explicit mode has nothing to fall back to: its failure is the run's
    model = build()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "compile", fake_compile)
        step = T.TrainStep(model, torch.optim.Adam(model.parameters()), lambda m, x: m(x), ["compile"], cpu,
                           torch.float32)
        with pytest.raises(RuntimeError, match="simulated inductor failure"):
            step(batches[0])


@pytest.fixture
def caplog_loguru():
    from loguru import logger

    lines = []
    handler = logger.add(lambda message: lines.append(message.rstrip("\n")), format="{level} | {message}")
    yield lines
    logger.remove(handler)


def test_auto_falls_back_from_a_failing_compile_in_the_script(tmp_path, capsys, monkeypatch, one_thread):
    """Through train_enwik8.main: `auto` made to try compile on the CPU, with torch.compile failing as inductor does
    on its first call; the run logs one warning, trains eagerly from the same step, and writes exactly the losses
    and weights of an eager run."""
    data = tmp_path / "text.txt"
    data.write_bytes(TEXT)
    real = T.step_modes
    monkeypatch.setattr(T, "step_modes", lambda requested, *a, **k: ["compile", "eager"] if requested == "auto"
                        else real(requested, *a, **k))

    def failing_compile(model, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("simulated: C++ compile failed")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    argv = [*TINY_INPROC, "--grad-accum", "2", "--data", data, "--num-batches", "4", "--generate-every", "100"]
    call(enwik8.main, [*argv, "--out-dir", tmp_path / "auto"])
    log = capsys.readouterr().out
    assert "training step: compile -> eager (--step-mode auto)" in log
    assert log.count("step mode compile failed") == 1
    assert "RuntimeError: simulated: C++ compile failed); falling back to eager" in log
    assert "(step mode eager, the first 1 (compilation, warm-up) untimed)" in log
    call(enwik8.main, [*argv, "--step-mode", "eager", "--out-dir", tmp_path / "eager"])
    assert "training step: eager (--step-mode eager)" in capsys.readouterr().out
    assert losses(read_metrics(tmp_path / "auto")) == losses(read_metrics(tmp_path / "eager"))
    auto = torch.load(tmp_path / "auto" / "checkpoint.pt", weights_only=True)["model"]
    eager = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["model"]
    assert auto.keys() == eager.keys() and all(torch.equal(auto[k], eager[k]) for k in auto)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_run_resumes_eager(tmp_path, capsys, one_thread):
    """A real torch.compile run on the CPU (the one slow compile of this file, about a minute on a busy CPU): its
    checkpoint holds the plain module's keys (no `_orig_mod.`) and resumes eagerly, with the losses of an eager run
    throughout."""
    data = tmp_path / "text.txt"
    data.write_bytes(TEXT)
    argv = [*TINY_INPROC, "--data", data, "--generate-every", "100"]
    out = tmp_path / "compiled"
    call(enwik8.main, [*argv, "--step-mode", "compile", "--num-batches", "2", "--out-dir", out])
    log = capsys.readouterr().out
    assert "training step: compile (--step-mode compile)" in log and "falling back" not in log
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any("_orig_mod" in key for key in state["model"]) and state["args"]["step_mode"] == "compile"
    call(enwik8.main, ["--out-dir", out, "--resume", "--num-batches", "4", "--step-mode", "eager"])
    assert "at step 2" in capsys.readouterr().out
    call(enwik8.main, [*argv, "--num-batches", "4", "--out-dir", tmp_path / "eager"])
    resumed, eager = losses(read_metrics(out)), losses(read_metrics(tmp_path / "eager"))
    assert resumed.keys() == eager.keys() == {1, 2, 3, 4}
    for step in eager:
        assert resumed[step] == pytest.approx(eager[step], rel=1e-4), step


def test_resume_may_trade_batch_size_for_grad_accum(tmp_path, capsys, one_thread):
    """4 x 2 sequences per step and 8 x 1 are the same 8 sequences in the same order: a resumed run may switch
    between them (e.g. an old 4 x 4 default run to the 16 x 1 one) and trains on as if it had not; a shape that
    changes the sequences per step is refused. --peak-tflops puts MFU in the closing line; on the CPU there is none
    by default."""
    data = tmp_path / "text.txt"
    data.write_bytes(TEXT)
    argv = [*TINY_INPROC, "--data", data, "--generate-every", "100", "--validate-every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    call(enwik8.main, [*argv, "--grad-accum", "2", "--num-batches", "4", "--out-dir", full])
    log = capsys.readouterr().out
    closing = [line for line in log.splitlines() if "| average " in line]
    assert len(closing) == 1 and "tokens/s over" in closing[0] and "MFU" not in closing[0]
    call(enwik8.main, [*argv, "--grad-accum", "2", "--num-batches", "2", "--out-dir", part])
    message = usage_error(capsys, enwik8.main, ["--out-dir", part, "--resume", "--batch-size", "8"])
    assert "--batch-size 4 (given 8)" in message
    call(enwik8.main, ["--out-dir", part, "--resume", "--num-batches", "4", "--batch-size", "8", "--grad-accum", "1",
                       "--peak-tflops", "1"])
    log = capsys.readouterr().out
    assert "resume: --batch-size 4 -> 8, --grad-accum 2 -> 1 (given on the command line; the same 8 sequences per " \
           "step, in the same order)" in log
    assert "MFU" in [line for line in log.splitlines() if "| average " in line][0]
    a, b = read_metrics(full), read_metrics(part)
    for row_a, row_b in zip(a, b, strict=True):
        assert float(row_b["train_loss"]) == pytest.approx(float(row_a["train_loss"]), rel=1e-5)
        if row_a["val_loss"]:
            assert float(row_b["val_loss"]) == pytest.approx(float(row_a["val_loss"]), rel=1e-5)
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    assert (state["args"]["batch_size"], state["args"]["grad_accum"]) == (8, 1)


def test_flops_per_token_by_hand():
    """The MFU numerator against a hand count of the tiny model (dim 32, 1 layer, 2 heads of 64, 256 tokens, rotary,
    windows of 32), and the formula of the classic model (6 N + 12 depth dim T)."""
    config = dict(model="decoder", num_tokens=256, max_seq_len=32, decoder=dict(dim=32, depth=1, heads=2,
                                                                                  rotary_pos_emb=True))
    model = T.build_model(config)
    # parameters that multiply: attention q, k, v (32 -> 2 x 64) and out (128 -> 32); feedforward 32 -> 128 -> 32 with
    # biases; logits 32 -> 256; three norm scales of 32. The token embedding (256 x 32) is a lookup.
    n = 4 * 32 * 128 + (32 * 128 + 128 + 128 * 32 + 32) + 32 * 256 + 3 * 32
    attention = 6 * 32 * 2 * (64 + 64)  # T x heads x (dim_head + value_dim_head), forward and backward
    assert n == 33_024 and T.flops_per_token(model, 32) == 6 * n + attention == 247_296
    # tied logits multiply with the embedding's weight: the same count
    tied = T.build_model({**config, "wrapper": dict(tie_embedding=True)})
    assert T.flops_per_token(tied, 32) == 247_296

    with torch.device("meta"):
        classic = T.build_model(enwik8.model_config(enwik8.parse_args([])))
    n = sum(p.numel() for p in classic.parameters()) - 256 * 512
    assert T.flops_per_token(classic, 1024) == 6 * n + 12 * 6 * 512 * 1024

    assert T.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989e12 and T.peak_tflops_for("NVIDIA H200") == 989e12
    assert T.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312e12 and T.peak_tflops_for("NVIDIA H100 PCIe") == 756e12
    assert T.peak_tflops_for("NVIDIA GeForce RTX 4090") is None
    assert T.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert T.peak_flops(torch.device("cpu"), torch.float32, tflops=2.0) == 2e12
    assert T.model_flops_utilization(1e6, 1e8, 1e15) == pytest.approx(0.1)
    assert T.model_flops_utilization(1e6, 1e8, None) is None


def test_build_model_takes_wrapper_keywords():
    """A checkpoint configuration's optional "wrapper" (TransformerWrapper keywords, as x_transformers.hf's import
    writes it) reaches the model, is checked like the rest, and reads the same in both places."""
    from x_transformers.x_transformers import TiedEmbeddingLogits

    config = dict(model="decoder", num_tokens=256, max_seq_len=32, decoder=dict(dim=32, depth=1, heads=2),
                  wrapper=dict(tie_embedding=True, emb_dropout=0.1), task="bytes")
    model = T.build_model(config)
    assert isinstance(model.net.to_logits, TiedEmbeddingLogits) and "net.to_logits.weight" not in model.state_dict()
    T.check_model_config(config)
    with pytest.raises(T.UsageError, match="no_such_keyword"):
        T.check_model_config({**config, "wrapper": dict(no_such_keyword=1)})
    # the training script writes no "wrapper": its flags are Decoder keywords
    assert "wrapper" not in enwik8.model_config(enwik8.parse_args([]))

    pytest.importorskip("transformers")
    from x_transformers import hf

    wrapper, decoder, _ = hf._checkpoint_spec({"config": config})
    net = hf.build_transformer_wrapper(wrapper, decoder)
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k.removeprefix("net."): v.shape for k, v in model.state_dict().items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the GPU defaults need a GPU")
def test_gpu_step_modes_agree_and_resume_across(tmp_path, capsys):
    """On a GPU (fp32, so the modes can agree closely): the CUDA-graph step and the compiled step give the eager
    step's losses, a graph run's checkpoint resumes eagerly, `auto` tries compile first, and the copy task's graph
    step trains too."""
    data = tmp_path / "text.txt"
    data.write_bytes(TEXT)
    gpu = [*[a if a != "cpu" else "cuda" for a in TINY_INPROC], "--dtype", "fp32", "--grad-accum", "2",
           "--data", data, "--generate-every", "100", "--validate-every", "3", "--log-every", "3"]
    runs = {}
    for mode in ("eager", "graph", "compile"):
        call(enwik8.main, [*gpu, "--num-batches", "6", "--step-mode", mode, "--out-dir", tmp_path / mode])
        log = capsys.readouterr().out
        assert "falling back" not in log and f"step mode {mode}" in log
        runs[mode] = losses(read_metrics(tmp_path / mode))
    for mode in ("graph", "compile"):
        for step, loss in runs["eager"].items():
            assert runs[mode][step] == pytest.approx(loss, rel=1e-3), (mode, step)

    out = tmp_path / "graph_then_eager"
    call(enwik8.main, [*gpu, "--num-batches", "5", "--step-mode", "graph", "--out-dir", out])
    call(enwik8.main, ["--out-dir", out, "--resume", "--num-batches", "6", "--step-mode", "eager"])
    for step, loss in runs["eager"].items():
        assert losses(read_metrics(out))[step] == pytest.approx(loss, rel=1e-3), step

    call(enwik8.main, [*gpu, "--num-batches", "2", "--out-dir", tmp_path / "auto"])
    assert "training step: compile -> graph -> eager (--step-mode auto)" in capsys.readouterr().out

    copy = [*[a if a != "cpu" else "cuda" for a in TINY_COPY], "--num-batches", "6", "--validate-every", "3"]
    for mode in ("eager", "graph"):
        call(copy_task.main, [*copy, "--dtype", "fp32", "--step-mode", mode, "--out-dir", tmp_path / f"copy_{mode}"])
    graph, eager = losses(read_metrics(tmp_path / "copy_graph")), losses(read_metrics(tmp_path / "copy_eager"))
    for step, loss in eager.items():
        assert graph[step] == pytest.approx(loss, rel=1e-3), step
