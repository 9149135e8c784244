"""The Hugging Face bridge (x_transformers/hf.py): transformers' generate against our AutoregressiveWrapper for
softmax attention, every mixer, a hybrid and mixture of experts; save / load; the training-checkpoint conversion
both ways; lm-eval on a local task. Skipped without the [hf] extra."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", minversion="5")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper  # noqa: E402
from x_transformers import training as T  # noqa: E402
from x_transformers.hf import (  # noqa: E402
    ByteTokenizer,
    XTransformersCache,
    XTransformersConfig,
    XTransformersForCausalLM,
    XTransformersModel,
    hf_key,
    load_transformer_wrapper,
    main,
    xt_key,
)
from x_transformers.mixers import MIXERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = dict(num_tokens=256, max_seq_len=48)
LAYERS = dict(dim=32, depth=2, heads=2)

CONFIGS = {
    "softmax": dict(rotary_pos_emb=True),
    **{name: dict(linear_attn=name) for name in sorted(MIXERS)},
    "hybrid": dict(linear_attn="gated_deltanet", hybrid_pattern="LN", rotary_pos_emb=True),
    "moe": dict(rotary_pos_emb=True, ff_num_experts=4, ff_moe_top_k=2),
}


# more flags, for the save / load round trip: the constructor keywords go through JSON and back
FLAG_CONFIGS = {
    "attention_flags": dict(rotary_pos_emb=True, attn_qk_norm=True, ff_glu=True, use_rmsnorm=True,
                            attn_gate_values=True, add_value_residual=True, attn_kv_heads=1),
    "scalenorm_layerscale_macaron": dict(use_scalenorm=True, use_layerscale=True, macaron=True, rotary_pos_emb=True),
    "data_dependent_alibi": dict(attn_data_dependent_alibi=True),
    "t5_relative_bias_shift_tokens": dict(rel_pos_bias=True, shift_tokens=1),
    "sandwich_gated_residual": dict(sandwich_norm=True, gate_residual=True, rotary_pos_emb=True),
    "multi_latent": dict(rotary_pos_emb=True, attn_use_latent_kv=True, attn_dim_latent_kv=16),
    "weight_tied_layers": dict(weight_tie_layers=True, rotary_pos_emb=True),
    "custom_layers": dict(custom_layers=["a", "f", "l", "f"], linear_attn="gla", depth=None, rotary_pos_emb=True),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models on a shared 2-core box: a second intra-op thread only waits on the first (10x slower steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(decoder=None, wrapper=None, seed=0):
    torch.manual_seed(seed)
    config = XTransformersConfig(wrapper_kwargs={**WRAPPER, **(wrapper or {})}, decoder_kwargs={**LAYERS, **decoder})
    model = XTransformersForCausalLM(config).eval()
    return model, AutoregressiveWrapper(model.to_transformer_wrapper())


def prompts(batch=2, length=6, seed=1):
    return torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_equals_ours(name):
    model, ours = make(CONFIGS[name])
    x = prompts()
    hf = model.generate(x, max_new_tokens=8, do_sample=False)
    assert torch.equal(hf[:, : x.shape[1]], x)
    assert torch.equal(hf[:, x.shape[1] :], ours.generate(x, 8, temperature=0.0, cache_kv=True))


@pytest.mark.parametrize("name", ["softmax", "gated_deltanet"])
def test_sampling_with_a_seed_equals_ours(name):
    # same filter (top-k 26 of 256 = our default fraction 0.1), temperature, and one torch.multinomial per step
    model, ours = make(CONFIGS[name])
    x = prompts()
    torch.manual_seed(123)
    hf = model.generate(x, max_new_tokens=10, do_sample=True, top_k=26, top_p=1.0, temperature=0.7)
    torch.manual_seed(123)
    expected = ours.generate(x, 10, temperature=0.7, filter_logits_fn="top_k", cache_kv=True)
    assert torch.equal(hf[:, x.shape[1] :], expected)


@pytest.mark.parametrize("name", ["softmax", "hgrn2", "hybrid"])
def test_beam_search_equals_ours(name):
    # the cache is reordered by the surviving beams' parents every step (reorder_cache)
    model, ours = make(CONFIGS[name])
    x = prompts()
    hf = model.generate(x, max_new_tokens=6, num_beams=2, do_sample=False, early_stopping=False)
    assert torch.equal(hf[:, x.shape[1] :], ours.beam_search(x, 6, beams=2))


@pytest.mark.parametrize("name", ["softmax", "rwkv6", "hybrid"])
def test_left_padded_batch_generates_as_one_by_one(name):
    model, ours = make(CONFIGS[name])
    tokenizer = ByteTokenizer(padding_side="left")
    texts = ["To be, or not", "Hi", "Speak the speech"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    out = model.generate(**batch, max_new_tokens=7, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for row, text in zip(out, texts):
        alone = tokenizer(text, return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=7, do_sample=False)[0, alone["input_ids"].shape[1] :]
        assert torch.equal(row, single)
    # and as our generate decodes prompts of different lengths
    rows = [tokenizer(t, return_tensors="pt")["input_ids"][0] for t in texts]
    assert torch.equal(out, ours.generate(rows, 7, temperature=0.0))


@pytest.mark.parametrize("name", ["softmax", "hybrid", "absolute"])
def test_decoding_past_max_seq_len_slides_the_window_as_ours(name):
    # rotary / mixers: the cache is trimmed to the window; an absolute positional embedding recomputes the window
    decoder = CONFIGS.get(name, {})
    model, ours = make(decoder)
    x = prompts()
    hf = model.generate(x, max_new_tokens=50, do_sample=False)
    expected = ours.generate(x, 50, temperature=0.0, cache_kv=name != "absolute")
    assert torch.equal(hf[:, x.shape[1] :], expected)


def test_cache_continues_exactly_and_can_be_reused():
    model, _ = make(CONFIGS["hybrid"])
    x = prompts(length=12)
    full = model(x, use_cache=False).logits
    first = model(x[:, :7], use_cache=True)
    assert isinstance(first.cache, XTransformersCache) and first.cache.get_seq_length() == 7
    rest = model(x[:, 7:], cache=first.cache)
    torch.testing.assert_close(rest.logits, full[:, 7:], rtol=1e-5, atol=1e-5)
    # generate continues from a cache of an earlier call; beam / batch surgery keeps rows aligned
    cache = model(x[:, :7], use_cache=True).cache
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert cache.batch_size == 2 and torch.equal(cache.tokens, x[[1, 0], :7])
    out = model(x[[1, 0], 7:], cache=cache).logits
    torch.testing.assert_close(out, full[[1, 0], 7:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


def test_softmax_cache_crops_for_assisted_decoding():
    model, _ = make(CONFIGS["softmax"])
    x = prompts(length=10)
    full = model(x, use_cache=False).logits
    cache = model(x, use_cache=True).cache
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(model(x[:, 7:], cache=cache).logits, full[:, 7:], rtol=1e-5, atol=1e-5)


def test_right_padding_mask_runs_uncached_and_exact():
    model, _ = make(CONFIGS["gla"])
    x = prompts(length=8)
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    out = model(x, attention_mask=mask, use_cache=True)
    # only the first 5 tokens of row 1 count: its logits there equal those of the unpadded row
    torch.testing.assert_close(out.logits[1, :5], model(x[1:, :5]).logits[0], rtol=1e-5, atol=1e-5)
    assert out.cache.state is None and out.cache.get_seq_length() == 8


@pytest.mark.parametrize("name", [*CONFIGS, *FLAG_CONFIGS])
def test_save_load_round_trips_any_configuration(name, tmp_path):
    model, ours = make({**CONFIGS, **FLAG_CONFIGS}[name])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = prompts(length=10)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    out = loaded.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, x.shape[1] :], ours.generate(x, 5, temperature=0.0))


def test_save_load_identical_logits_and_no_gamma_beta_keys(tmp_path):
    # default LayerNorm (gamma), DeltaNet (to_beta), hyper-connections (static / dynamic beta), ALiBi (slopes, a
    # buffer our module computes), a tied embedding
    decoder = dict(linear_attn="deltanet", hybrid_pattern="LN", alibi_pos_bias=True, num_residual_streams=2)
    model, ours = make(decoder, wrapper=dict(tie_embedding=True))
    names = list(model.state_dict())
    assert any("gam_ma" in n for n in names) and any("be_ta" in n for n in names)
    assert not any("gamma" in n or "beta" in n for n in names)
    assert all(xt_key(hf_key(n)) == n for n in ours.net.state_dict())

    model.save_pretrained(tmp_path)
    ByteTokenizer().save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert not any("gamma" in k or "beta" in k for k in saved)

    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "x_transformers" and config.decoder_kwargs["linear_attn"] == "deltanet"
    assert config.layer_types == ["linear_attention", "full_attention"] and config.tie_word_embeddings
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is XTransformersForCausalLM
    assert not any(info.values()), info
    x = prompts(length=10)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded(x).logits, ours.net(x), rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is XTransformersModel
    assert base(x).last_hidden_state.shape == (2, 10, 32)
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path), ByteTokenizer)

    net, _ = load_transformer_wrapper(tmp_path)
    torch.testing.assert_close(net(x), ours.net(x), rtol=0, atol=0)


def test_wraps_a_trained_transformer_wrapper():
    # ALiBi slopes and sinusoidal frequencies: buffers a plain TransformerWrapper leaves out of its state dict
    wrapper, decoder = dict(WRAPPER, scaled_sinu_pos_emb=True), dict(LAYERS, alibi_pos_bias=True)
    net = TransformerWrapper(**wrapper, attn_layers=Decoder(**decoder)).eval()
    model = XTransformersForCausalLM.from_transformer_wrapper(net, wrapper, decoder).eval()
    x = prompts()
    torch.testing.assert_close(model(x).logits, net(x), rtol=0, atol=0)
    assert model.x_transformers_state_dict().keys() == net.state_dict().keys()
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.zeros(1, 2, 32))


def test_labels_give_the_autoregressive_loss():
    model, ours = make(CONFIGS["softmax"])
    x = prompts(length=12)
    torch.testing.assert_close(model(x, labels=x).loss, ours(x), rtol=1e-5, atol=1e-6)
    # mixture of experts: plus the experts' balance / router losses, as our wrapper adds them
    model, ours = make(CONFIGS["moe"])
    out = model(x, labels=x)
    _, intermediates = ours.net(x, return_intermediates=True)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert intermediates.aux_loss is not None
    torch.testing.assert_close(out.loss, ce + intermediates.aux_loss)


def test_byte_tokenizer_round_trips_utf8():
    tokenizer = ByteTokenizer()
    text = "naïve café ✓\n<page>"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0 and tokenizer.bos_token_id is None
    assert tokenizer.decode([0xE2, 0x9C]) == "\ufffd"  # a cut UTF-8 sequence


def load_script(path):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_under_hf_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def enwik8_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("enwik8")
    train = load_script(ROOT / "train_enwik8.py")
    train.main([
        "--dim", "32", "--depth", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1",
        "--num-batches", "2", "--validate-every", "2", "--generate-every", "1000", "--generate-length", "8",
        "--prime-length", "8", "--linear-attn", "gated_deltanet", "--hybrid-pattern", "LN", "--device", "cpu",
        "--seed", "0", "--out-dir", str(out),
    ])
    return out / "checkpoint.pt"


def test_export_import_round_trips_an_enwik8_checkpoint(enwik8_checkpoint, tmp_path, capsys):
    hf_dir, back = tmp_path / "hf", tmp_path / "back.pt"
    main(["export", str(enwik8_checkpoint), str(hf_dir)])
    assert "wrote" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()
    }

    state = T.load_checkpoint(enwik8_checkpoint)
    reference = T.build_model(state["config"]).eval()
    reference.load_state_dict(state["model"])

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.training_step == state["step"] and model.config.task == "bytes"
    inputs = tokenizer("First Citizen:", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = reference.generate(inputs["input_ids"], 12, temperature=0.0)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], expected)
    assert tokenizer.decode(out[0]).startswith("First Citizen:")

    main(["import", str(hf_dir), str(back)])
    imported = T.load_checkpoint(back)
    assert imported["config"] == state["config"] and imported["step"] == state["step"]
    assert imported["model"].keys() == state["model"].keys()
    assert all(torch.equal(imported["model"][k], v) for k, v in state["model"].items())


LM_EVAL_TASKS = """
task: xt_local_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
---
task: xt_local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_runs_loglikelihood_and_generate_until(tmp_path, monkeypatch):
    # no network, and the datasets cache in tmp (read when `datasets` is first imported, by lm-eval)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    model, _ = make(CONFIGS["hybrid"])
    model.save_pretrained(tmp_path / "model")
    ByteTokenizer(model_max_length=48).save_pretrained(tmp_path / "model")

    data = tmp_path / "data.jsonl"
    docs = [dict(context="The cat sat on the", continuation=" mat"), dict(context="One, two,", continuation=" three")]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for i, text in enumerate(LM_EVAL_TASKS.format(data=data).split("---")):
        (tasks / f"task{i}.yaml").write_text(text)

    # what `lm-eval --model hf --model_args pretrained=DIR` runs, minus the scan of lm-eval's own task folders
    # (some 15 s; the command line always makes it)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=dict(pretrained=str(tmp_path / "model"), backend="causal"),
        tasks=["xt_local_loglikelihood", "xt_local_generate"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
        batch_size=2,
    )
    results = out["results"]
    assert results["xt_local_loglikelihood"]["perplexity,none"] > 1
    assert results["xt_local_generate"]["exact_match,none"] == 0.0
    assert len(out["samples"]["xt_local_generate"]) == 2


def test_lm_eval_command_gets_our_classes_and_the_causal_backend(monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval.__main__

    seen = {}

    def fake_cli():
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        seen.update(argv=list(__import__("sys").argv), registered="x_transformers" in CONFIG_MAPPING)

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    main(["lm-eval", "--model", "hf", "--model_args", "pretrained=DIR", "--tasks", "t"])
    assert seen == dict(
        argv=["lm-eval", "--model", "hf", "--model_args", "pretrained=DIR,backend=causal", "--tasks", "t"],
        registered=True,
    )
