"""Build training-parity fixtures from the x-transformers 2.0.1 PyPI release: the same model, data and optimizer must
give the same loss curve here as there.

Run it with the interpreter of a separate virtual environment that has the release installed
(`upvenv/bin/python scripts/make_training_fixtures.py`). Each fixture, `tests/fixtures/training/<name>.pt`, holds
a config, the release's freshly initialised state dict, and the losses it computed over STEPS Adam steps on fixed
random batches (fp32, no dropout). `tests/test_training_parity.py` builds the same model with our package, loads that
state dict, runs the same steps through `train` below and compares the losses step by step: forward, loss, every
gradient and the update have to agree for the curves to stay together.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from x_transformers import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper, XTransformer

STEPS = 30
NUM_TOKENS = 32
SEQ_LEN = 24
BATCH = 4
LR = 3e-3

CONFIGS = {
    # the enwik8 script's model in miniature
    "decoder_rotary": dict(kind="lm", layers=dict(dim=32, depth=2, heads=4, attn_dim_head=8, rotary_pos_emb=True)),
    "decoder_glu_rmsnorm_gqa_flash": dict(kind="lm", layers=dict(
        dim=32, depth=2, heads=4, attn_dim_head=8, attn_kv_heads=2, attn_flash=True, ff_glu=True, use_rmsnorm=True,
        rotary_pos_emb=True,
    )),
    "decoder_alibi_qk_norm_tied": dict(kind="lm", layers=dict(
        dim=32, depth=2, heads=4, attn_dim_head=8, alibi_pos_bias=True, attn_qk_norm=True, ff_swish=True,
    ), wrapper=dict(tie_embedding=True)),
    "encoder_mlm_like": dict(kind="encoder", layers=dict(dim=32, depth=2, heads=4, attn_dim_head=8, rel_pos_bias=True)),
    # the copy script's model in miniature
    "xtransformer": dict(kind="xtransformer", kwargs=dict(
        dim=32, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=4, enc_attn_dim_head=8, enc_max_seq_len=SEQ_LEN,
        dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_heads=4, dec_attn_dim_head=8, dec_max_seq_len=SEQ_LEN,
        tie_token_emb=True,
    )),
}


def build(config):
    """The model a config describes, against whichever x_transformers package is importable."""
    kind = config["kind"]
    if kind == "xtransformer":
        return XTransformer(**config["kwargs"])
    layers = (Decoder if kind == "lm" else Encoder)(**config["layers"])
    wrapper_kwargs = config.get("wrapper", {})
    net = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=SEQ_LEN, attn_layers=layers, **wrapper_kwargs)
    return AutoregressiveWrapper(net) if kind == "lm" else net


def batches(seed: int):
    """STEPS fixed batches of learnable sequences: each row counts up from a random start by a random stride (1 to 4)
    modulo NUM_TOKENS, so the losses fall well within the run (random tokens would leave them flat)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(SEQ_LEN + 1)
    out = []
    for _ in range(STEPS):
        start = torch.randint(0, NUM_TOKENS, (BATCH, 1), generator=gen)
        stride = torch.randint(1, 5, (BATCH, 1), generator=gen)
        out.append((start + stride * positions) % NUM_TOKENS)
    return out


def loss_fn(model, config, tokens):
    kind = config["kind"]
    if kind == "lm":
        return model(tokens)
    if kind == "xtransformer":
        src = tokens[:, :SEQ_LEN]
        return model(src, torch.cat((tokens[:, :1], src[:, :-1]), dim=-1))
    # encoder: predict each token from a copy with every fourth position replaced by token 0
    inp = tokens[:, :SEQ_LEN].clone()
    inp[:, ::4] = 0
    logits = model(inp)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, :SEQ_LEN])


def train(model, config, seed: int) -> list[float]:
    """STEPS Adam steps on the fixed batches; the loss of each step (fp32, dropout off: the configs set none)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, foreach=False)
    model.train()
    losses = []
    for tokens in batches(seed):
        loss = loss_fn(model, config, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "training"
    parser.add_argument("--out-dir", default=str(default_dir))
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for seed, (name, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        model = build(config)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        losses = train(model, config, seed)
        fixture = dict(config=config, state_dict=init, losses=losses, seed=seed, upstream_version="2.0.1")
        path = out_dir / f"{name}.pt"
        torch.save(fixture, path, _use_new_zipfile_serialization=False)
        print(f"{name:32s} {path.stat().st_size / 1024:6.1f} KiB  loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
