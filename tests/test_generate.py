"""generate.py on checkpoints written by tiny training runs (in-process): the streamed text is the text
AutoregressiveWrapper.generate returns for the same seed, and every input it cannot take is a one-line usage error."""

import gzip
import importlib.util
import io
from pathlib import Path

import pytest
import torch

from x_transformers import training as T

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_enwik8, train_copy, generate = load_script("train_enwik8"), load_script("train_copy"), load_script("generate")

SEQ_LEN = 32
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", str(SEQ_LEN), "--batch-size", "4",
        "--grad-accum", "1", "--lr", "3e-3", "--num-batches", "2", "--validate-every", "2", "--generate-length", "8",
        "--prime-length", "8", "--device", "cpu", "--seed", "0"]
TINY_COPY = ["--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "6", "--num-symbols", "4",
             "--batch-size", "16", "--val-size", "8", "--num-batches", "2", "--validate-every", "2", "--device", "cpu",
             "--seed", "0"]
MODELS = {
    "softmax": [],
    "gated_deltanet": ["--linear-attn", "gated_deltanet"],
    "hybrid": ["--linear-attn", "gated_deltanet", "--hybrid-pattern", "LN", "--depth", "2"],
    "absolute": ["--config", '{"rotary_pos_emb": false}'],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # models this small run fastest on one thread; more only contend for a busy CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = root / "text.txt"
    data.write_text("ROMEO: But soft, what light through yonder window breaks? It is the east.\n" * 40)
    # a module fixture runs before conftest's per-test switch to the PyTorch path: switch here too, or the mixers
    # would run their Triton kernels in the (slow) interpreter
    with pytest.MonkeyPatch.context() as env:
        if not torch.cuda.is_available():
            env.setenv("TRITON_INTERPRET", "0")
        for name, flags in MODELS.items():
            train_enwik8.main([*TINY, *flags, "--data", str(data), "--out-dir", str(root / name)])
        train_copy.main([*TINY_COPY, "--out-dir", str(root / "copy")])
    return {name: root / name / "checkpoint.pt" for name in [*MODELS, "copy"]}


def run_generate(*argv) -> str:
    out = io.StringIO()
    generate.main([str(a) for a in argv], out=out)
    return out.getvalue()


def load(ckpt):
    state = T.load_checkpoint(ckpt)
    model = T.build_model(state["config"])
    model.load_state_dict(state["model"])
    return model.eval()


def reference(ckpt, prompt: bytes, length, seed=None, samples=1, **generate_kwargs) -> str:
    """What generate.py should print: prompt and AutoregressiveWrapper.generate's continuation, per sample."""
    model = load(ckpt)
    if seed is not None:
        torch.manual_seed(seed)
    texts = []
    for _ in range(samples):
        out = model.generate(torch.tensor(list(prompt))[None], length, cache_kv=True, **generate_kwargs)
        texts.append(T.decode_bytes(prompt) + T.decode_bytes(out[0].tolist()) + "\n")
    return (generate.RULE + "\n").join(texts)


@pytest.mark.parametrize("name", ["softmax", "gated_deltanet", "hybrid"])
def test_streamed_text_is_what_generate_returns(ckpts, name):
    ckpt = ckpts[name]
    # greedy
    text = run_generate("--checkpoint", ckpt, "--prompt", "ROMEO:", "--length", 20, "--temperature", 0)
    assert text == reference(ckpt, b"ROMEO:", 20, temperature=0.0, fast_decode=False)
    # sampled, with a seed and a filter
    text = run_generate("--checkpoint", ckpt, "--prompt", "ROMEO:", "--length", 20, "--seed", 3, "--top-k", 5)
    assert text == reference(ckpt, b"ROMEO:", 20, seed=3, filter_logits_fn="top_k", filter_kwargs=dict(k=5),
                             fast_decode=False)
    # past max_seq_len: the sliding window of the library's plain path, prompt longer than the window included
    prompt = "But soft, what light through yonder window breaks?"  # 50 bytes, past the 32 of the window
    text = run_generate("--checkpoint", ckpt, "--prompt", prompt, "--length", 30, "--seed", 5)
    assert text == reference(ckpt, prompt.encode(), 30, seed=5, filter_logits_fn=lambda logits: logits,
                             fast_decode=False)


@pytest.mark.parametrize("name", ["softmax", "hybrid"])
def test_static_cache_decoder_streams_what_it_returns(ckpts, name):
    """--fast-decode on (the eager static-cache step on CPU): the same samples as generate(fast_decode=True), for
    chained filters and several samples from one seed."""
    ckpt = ckpts[name]
    text = run_generate("--checkpoint", ckpt, "--prompt", "ROMEO:", "--length", 16, "--seed", 1, "--top-p", 0.9,
                        "--min-p", 0.05, "--num-samples", 2, "--fast-decode", "on")
    filters = generate.make_filter(generate.build_parser().parse_args(["--top-p", "0.9", "--min-p", "0.05"]))
    assert text == reference(ckpt, b"ROMEO:", 16, seed=1, samples=2, filter_logits_fn=filters, fast_decode=True)
    assert text.count(generate.RULE) == 1


def test_copy_checkpoint_decodes_the_source(ckpts):
    model = load(ckpts["copy"])
    src = torch.tensor([[2, 3, 4, 5, 2, 3]])
    expected = model.generate(src, torch.ones(1, 1, dtype=torch.long), 6, mask=torch.ones_like(src).bool(),
                              temperature=0.0, fast_decode=False)[0].tolist()
    text = run_generate("--checkpoint", ckpts["copy"], "--prompt", "[2, 3, 4, 5, 2, 3]", "--temperature", 0)
    lines = text.splitlines()
    assert lines[0] == "source: 2 3 4 5 2 3"
    assert lines[1] == "copy:   " + " ".join(map(str, expected))
    correct = sum(a == b for a, b in zip(expected, [2, 3, 4, 5, 2, 3]))
    assert lines[2] == f"correct: {correct} of 6 symbols"
    # no prompt: a source drawn from the seed, the full training length
    lines = run_generate("--checkpoint", ckpts["copy"], "--seed", 0).splitlines()
    assert len(lines[0].split()) == 1 + 6 and lines[2].endswith("of 6 symbols")


def test_prompt_file_any_format(ckpts, tmp_path):
    plain = run_generate("--checkpoint", ckpts["softmax"], "--prompt", "ROMEO:\n", "--length", 8, "--temperature", 0)
    path = tmp_path / "prompt.txt.gz"
    path.write_bytes(gzip.compress(b"ROMEO:\n"))
    assert run_generate("--checkpoint", ckpts["softmax"], "--prompt-file", path, "--length", 8,
                        "--temperature", 0) == plain


def test_text_streams_whole_characters():
    out = io.StringIO()
    stream = generate.TextStream(out)
    stream.write_bytes("é".encode()[:1])
    assert out.getvalue() == ""  # half a character waits for the rest
    stream.write_bytes("é".encode()[1:] + b"\x1b[2J")
    assert out.getvalue() == "é [2J"  # escape sequences do not reach the terminal
    stream.write_bytes(b"\xc3")
    stream.finish()
    assert out.getvalue() == "é [2J\ufffd"


def usage_error(capsys, argv) -> str:
    """Run generate.py expecting a usage error: exit status 2 and one error line, returned."""
    with pytest.raises(SystemExit) as exit_info:
        run_generate(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def test_bad_inputs_are_one_line_usage_errors(ckpts, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpts["softmax"].read_bytes()[:2000])
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    lm, absolute, copy = ckpts["softmax"], ckpts["absolute"], ckpts["copy"]
    cases = [
        (["--checkpoint", lm, "--prompt", ""], "prompt is empty"),
        (["--checkpoint", lm], "--prompt TEXT or --prompt-file PATH"),
        (["--checkpoint", tmp_path / "missing.pt", "--prompt", "a"], "missing.pt does not exist"),
        (["--checkpoint", truncated, "--prompt", "a"], "truncated.pt is not a readable checkpoint"),
        (["--checkpoint", not_ours, "--prompt", "a"], "other.pt is not a checkpoint"),
        (["--checkpoint", lm, "--prompt-file", tmp_path / "nope.txt"], "--prompt-file"),
        (["--checkpoint", lm, "--prompt", "a", "--temperature", 0, "--top-k", 3], "greedy"),
        (["--checkpoint", lm, "--prompt", "a", "--top-k", 300], "256 tokens"),
        (["--checkpoint", lm, "--prompt", "a", "--length", 0], "--length: must be at least 1"),
        (["--checkpoint", lm, "--prompt", "a", "--top-p", 1.5], "--top-p: must be above 0 and at most 1"),
        (["--checkpoint", lm, "--prompt", "a", "--length", 40, "--fast-decode", "on"], "does not slide"),
        (["--checkpoint", absolute, "--prompt", "x" * 40], "longer than the model's context"),
        (["--checkpoint", absolute, "--prompt", "x" * 10, "--length", 30], "use --length 23 or less"),
        (["--checkpoint", copy, "--prompt", "1 2 3"], "symbol 1 is outside 2 .. 5"),
        (["--checkpoint", copy, "--prompt", "2 3 x"], "'x' is not a symbol id"),
        (["--checkpoint", copy, "--prompt", "2 " * 7], "at most 6"),
        (["--checkpoint", copy, "--length", 4], "--length does not apply"),
    ]
    for argv, expected in cases:
        assert expected in usage_error(capsys, argv), argv
    # the absolute-position model takes what fits: a 10-byte prompt and 23 new bytes read 32 positions
    assert run_generate("--checkpoint", absolute, "--prompt", "x" * 10, "--length", 23, "--temperature", 0)


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: 256)" in text and "{auto,on,off}" in text
    assert "slides a" in text  # how a text longer than the context is handled
