"""Build parity fixtures from the x-transformers 2.0.1 PyPI release.

Run it with the interpreter of a separate virtual environment that has the release installed
(`upvenv/bin/python scripts/make_parity_fixtures.py`). Each fixture is a tiny model built with a fixed seed:
`tests/fixtures/parity/<name>.pt` = {spec, state_dict, inputs, expected}. `tests/test_parity.py` rebuilds the same
model from `spec` with our package, loads the state dict with strict=True and compares the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import x_transformers
from x_transformers import x_transformers as xt

NUM_TOKENS = 24
MAX_SEQ_LEN = 16
DIM = 16
SMALL = dict(dim=DIM, depth=2, heads=2, attn_dim_head=8, ff_mult=2)


def lm(layers="Decoder", wrapper_kwargs=None, inputs=("tokens",), **layers_kwargs):
    """Spec of a TransformerWrapper around `layers` with tiny sizes."""
    return dict(
        kind="wrapper",
        layers=layers,
        layers_kwargs={**SMALL, **layers_kwargs},
        wrapper_kwargs=dict(num_tokens=NUM_TOKENS, max_seq_len=MAX_SEQ_LEN, **(wrapper_kwargs or {})),
        inputs=list(inputs),
    )


CONFIGS = {
    "plain_decoder": lm(),
    "rotary_glu_rmsnorm": lm(rotary_pos_emb=True, ff_glu=True, use_rmsnorm=True),
    "encoder_mask_memory_tokens": lm("Encoder", wrapper_kwargs=dict(num_memory_tokens=2), inputs=("tokens", "mask")),
    "xtransformer": dict(
        kind="xtransformer",
        kwargs=dict(
            dim=DIM,
            enc_num_tokens=NUM_TOKENS,
            enc_depth=2,
            enc_heads=2,
            enc_attn_dim_head=8,
            enc_max_seq_len=MAX_SEQ_LEN,
            dec_num_tokens=NUM_TOKENS,
            dec_depth=2,
            dec_heads=2,
            dec_attn_dim_head=8,
            dec_max_seq_len=MAX_SEQ_LEN,
            tie_token_emb=True,
        ),
    ),
    "vit": dict(
        kind="vit",
        layers="Encoder",
        layers_kwargs=dict(SMALL),
        wrapper_kwargs=dict(image_size=8, patch_size=4, num_classes=5, num_register_tokens=2),
    ),
    "alibi": lm(alibi_pos_bias=True, alibi_num_heads=1),
    "t5_rel_pos": lm("Encoder", rel_pos_bias=True, inputs=("tokens", "mask")),
    "residual_attn": lm(residual_attn=True),
    "sandwich_norm": lm(sandwich_norm=True),
    "gqa": lm(heads=4, attn_kv_heads=2),
    "one_kv_head": lm(attn_one_kv_head=True),
    "macaron": lm(macaron=True),
    "shift_tokens": lm(shift_tokens=1),
    "shift_tokens_per_layer": lm("Encoder", shift_tokens=(1, 0, 1, 0), inputs=("tokens", "mask")),
    "hyper_connections": lm(num_residual_streams=4),
    "value_residual": lm(add_value_residual=True),
    "value_residual_fixed_mix": lm(add_value_residual=True, learned_value_residual_mix=False),
    "scalenorm_post_norm": lm(use_scalenorm=True, pre_norm=False),
    "simple_rmsnorm_sinusoidal": lm(use_simple_rmsnorm=True, wrapper_kwargs=dict(scaled_sinu_pos_emb=True)),
    "talking_heads_gated": lm(attn_pre_talking_heads=True, attn_post_talking_heads=True, attn_gate_values=True, attn_head_scale=True),
    "qk_norm": lm(attn_qk_norm=True, attn_qk_norm_dim_scale=True),
    "mem_kv_on_attn": lm(attn_num_mem_kv=2, attn_on_attn=True),
    "dynamic_pos_bias": lm("Encoder", dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True, inputs=("tokens", "mask")),
    "rotary_xpos": lm(rotary_xpos=True, rotary_emb_dim=4),
    "gate_residual_scale": lm(gate_residual=True, scale_residual=True, ff_no_bias=True),
    "layerscale_ff_variants": lm(use_layerscale=True, ff_swish=True, ff_post_act_ln=True),
    "relu_squared_l2norm_embed": lm(ff_relu_squared=True, wrapper_kwargs=dict(l2norm_embed=True, post_emb_norm=True)),
    "unet_skips": lm("Encoder", depth=4, unet_skips=True, inputs=("tokens", "mask")),
    "cross_attend_decoder": lm(cross_attend=True, inputs=("tokens", "context", "context_mask")),
    "cls_token": lm("Encoder", wrapper_kwargs=dict(use_cls_token=True), inputs=("tokens", "mask")),
    "average_pool": lm("Encoder", wrapper_kwargs=dict(average_pool_embed=True, logits_dim=3), inputs=("tokens", "mask")),
    "tied_embedding_emb_dim": lm(wrapper_kwargs=dict(tie_embedding=True)),
    "adaptive_layernorm": lm(use_adaptive_layernorm=True, use_adaptive_layerscale=True, dim_condition=8, inputs=("tokens", "condition")),
    "adaptive_rmsnorm_mlp": lm(use_adaptive_rmsnorm=True, adaptive_condition_mlp=True, dim_condition=8, inputs=("tokens", "condition")),
    "softclamp_laser": lm(attn_softclamp_logits=True, attn_laser=True, softclamp_output=True),
    "data_dependent_alibi": lm(attn_data_dependent_alibi=True),
    "cope": lm(attn_use_cope=True),
    "multi_latent_attention": lm(
        attn_use_latent_q=True, attn_dim_latent_q=16, attn_use_latent_kv=True, attn_dim_latent_kv=16, attn_latent_rope_subheads=2,
        rotary_pos_emb=True,
    ),
    "weight_tie_layers": lm(depth=3, weight_tie_layers=True),
    "custom_layers": lm(depth=None, custom_layers=("a", "a", "f", "a", "f"), layers_execute_order=(0, 1, 2, 3, 4, 3, 4)),
    "prefix_decoder": dict(kind="layers", layers="PrefixDecoder", layers_kwargs=dict(dim=DIM, depth=2, heads=2, attn_dim_head=8), prefix_attn_len=3),
    "cross_attender": dict(kind="layers", layers="CrossAttender", layers_kwargs=dict(dim=DIM, depth=2, heads=2, attn_dim_head=8)),
    "mixture_of_softmax": lm(wrapper_kwargs=dict(mixture_of_softmax=True, mixture_of_softmax_k=2)),
    "reinject_recycling": lm(reinject_input=True, learned_reinject_input_gate=True, wrapper_kwargs=dict(recycling=True), inputs=("tokens", "recycle_steps")),
    "memory_tokens_interspersed": lm(wrapper_kwargs=dict(num_memory_tokens=1, memory_tokens_interspersed_every=4)),
    # forward conventions: Transformer-XL memories, left padding, prepended embeddings, custom positions, z-loss
    "xl_mems_rotary": lm(rotary_pos_emb=True, wrapper_kwargs=dict(max_mem_len=4), inputs=("tokens", "mems")),
    "seq_start_pos": lm(inputs=("tokens", "seq_start_pos")),
    "prepend_embeds": lm("Encoder", inputs=("tokens", "mask", "prepend_embeds")),
    "custom_alibi_pos": lm(alibi_pos_bias=True, inputs=("tokens", "pos")),
    "attn_z_loss_sum_embeds": lm(inputs=("tokens", "sum_embeds", "return_attn_z_loss")),
}


def make_inputs(spec, gen):
    b, n = 2, 12
    out = {}
    for name in spec.get("inputs", ()):
        if name == "tokens":
            out["x"] = torch.randint(0, NUM_TOKENS, (b, n), generator=gen)
        elif name == "mask":
            mask = torch.ones(b, n, dtype=torch.bool)
            mask[1, 8:] = False
            out["mask"] = mask
        elif name == "context":
            out["context"] = torch.randn(b, 5, DIM, generator=gen)
        elif name == "context_mask":
            mask = torch.ones(b, 5, dtype=torch.bool)
            mask[0, 3:] = False
            out["context_mask"] = mask
        elif name == "condition":
            out["condition"] = torch.randn(b, 8, generator=gen)
        elif name == "recycle_steps":
            out["recycle_steps"] = 3
        elif name == "mems":
            out["mems"] = [torch.randn(b, 4, DIM, generator=gen) for _ in range(2)]
        elif name == "seq_start_pos":
            out["seq_start_pos"] = torch.tensor([0, 3])
        elif name == "prepend_embeds":
            out["prepend_embeds"] = torch.randn(b, 3, DIM, generator=gen)
        elif name == "pos":
            out["pos"] = torch.stack((torch.arange(n), torch.arange(n) + 3))
        elif name == "sum_embeds":
            out["sum_embeds"] = torch.randn(b, n, DIM, generator=gen)
        elif name == "return_attn_z_loss":
            out["return_attn_z_loss"] = True
    return out


def build(spec):
    """Build the model a spec describes, against whichever x_transformers package is importable."""
    kind = spec["kind"]
    if kind == "xtransformer":
        return x_transformers.XTransformer(**spec["kwargs"])
    layers = getattr(xt, spec["layers"])(**{k: v for k, v in spec["layers_kwargs"].items() if v is not None})
    if kind == "vit":
        return xt.ViTransformerWrapper(attn_layers=layers, **spec["wrapper_kwargs"])
    if kind == "layers":
        return layers
    return xt.TransformerWrapper(attn_layers=layers, **spec["wrapper_kwargs"])


def run(model, spec, inputs):
    """Outputs to compare, as a dict of tensors."""
    kind = spec["kind"]
    if kind == "xtransformer":
        enc = model.encoder(inputs["src"], mask=inputs["src_mask"], return_embeddings=True)
        logits = model.decoder.net(inputs["tgt"], context=enc, context_mask=inputs["src_mask"])
        return dict(encoding=enc, logits=logits, loss=model(inputs["src"], inputs["tgt"], mask=inputs["src_mask"]))
    if kind == "vit":
        logits, embed = model(inputs["img"], return_logits_and_embeddings=True)
        return dict(logits=logits, embed=embed)
    if kind == "layers":
        kwargs = {k: v for k, v in inputs.items() if k != "x"}
        return dict(out=model(inputs["x"], **kwargs))
    logits, inter = model(**inputs, return_intermediates=True)
    out = dict(logits=logits, last_hidden=inter.last_hidden)
    if inputs.get("return_attn_z_loss"):
        out.update(attn_z_loss=inter.attn_z_loss)
    return out


def make_fixture(name, spec, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build(spec).eval()

    # perturb every parameter so zero / identity initializations do not hide a mismatch
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)

    kind = spec["kind"]
    if kind == "xtransformer":
        src_mask = torch.ones(2, 10, dtype=torch.bool)
        src_mask[1, 7:] = False
        inputs = dict(
            src=torch.randint(0, NUM_TOKENS, (2, 10), generator=gen),
            tgt=torch.randint(0, NUM_TOKENS, (2, 9), generator=gen),
            src_mask=src_mask,
        )
    elif kind == "vit":
        inputs = dict(img=torch.randn(2, 3, 8, 8, generator=gen))
    elif kind == "layers":
        inputs = dict(x=torch.randn(2, 7, DIM, generator=gen))
        if spec["layers"] == "CrossAttender":
            inputs.update(context=torch.randn(2, 5, DIM, generator=gen), context_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
        if "prefix_attn_len" in spec:
            inputs.update(prefix_attn_len=spec["prefix_attn_len"])
    else:
        inputs = make_inputs(spec, gen)

    with torch.no_grad():
        expected = run(model, spec, inputs)

    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    return dict(spec=spec, state_dict=state_dict, inputs=inputs, expected=expected, upstream_version="2.0.1")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"))
    parser.add_argument("--only", nargs="*", default=None, help="names of the configs to (re)build")
    args = parser.parse_args()

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    total = 0
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        if args.only and name not in args.only:
            continue
        fixture = make_fixture(name, spec, seed)
        path = out_dir / f"{name}.pt"
        # the legacy (non-zip) format is about half the size for many tiny tensors
        torch.save(fixture, path, _use_new_zipfile_serialization=False)
        total += path.stat().st_size
        print(f"{name:32s} {path.stat().st_size / 1024:6.1f} KiB")
    print(f"total {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
