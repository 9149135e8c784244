"""Hugging Face `transformers` bridge: any `TransformerWrapper` + `Decoder` configuration as a transformers model.

    pip install 'x-transformers-hybrid[hf]'

    python -m x_transformers.hf export out/checkpoint.pt hf-model/      # training checkpoint -> HF directory
    python -m x_transformers.hf import hf-model/ out.pt                 # HF directory -> training checkpoint
    python -m x_transformers.hf lm-eval --model hf --model_args pretrained=hf-model --tasks ...

Importing this module registers the classes with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoTokenizer` (model type "x_transformers"); `import x_transformers` alone never imports transformers.

- `XTransformersConfig` keeps the constructor keywords of the `TransformerWrapper` (`wrapper_kwargs`) and of its
  `Decoder` (`decoder_kwargs`) as JSON, so any flag, mixer, hybrid or mixture of experts round-trips; the fields other
  libraries read (`vocab_size`, `max_position_embeddings`, `layer_types`, ...) are derived from them.
- `XTransformersForCausalLM` holds the `TransformerWrapper` as `model`, with our own parameter names under it, except
  that every `gamma` / `beta` in a name is spelled `gam_ma` / `be_ta` (`hf_key`, `xt_key`): some transformers
  versions rename such keys on load (to `weight` / `bias`), which would silently drop those weights.
- `XTransformersCache` carries our decode state (key / values, mixers' recurrent and convolution states, hybrid
  module states) together with every token seen so far: our network derives positions from the whole sequence, so
  each step it is called with the history plus the new tokens, exactly as `AutoregressiveWrapper.generate` calls it.
  Greedy decoding therefore gives our tokens, and sampling with the same seed our samples.
- `ByteTokenizer`: ids are bytes 0-255 (UTF-8 text, decoded with U+FFFD for invalid bytes). Byte 0 (NUL) is the
  eos and pad token: byte-level corpora such as enwik8 never contain it, and `AutoregressiveWrapper` pads with 0 too.
  The model's generation config has no eos (decoding runs to the requested length, like ours) and pad id 0, so
  `generate` masks left padding by itself; pass `eos_token_id=0` to stop on NUL (then pass the tokenizer's
  `attention_mask` for padded batches, as transformers cannot tell padding from eos).

Padding: left padding (an attention mask of zeros then ones per row) is handled as our `seq_start_pos`, with the
cache. Any other mask is passed to the network as `mask` and the cache then only keeps the tokens, so each step runs
the whole sequence again (still exact). Decoding past `max_seq_len` slides a window over the last `max_seq_len`
tokens, as our `generate` does (`restrict_to_max_seq_len` in the config turns it off).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizer,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from x_transformers.attend import Intermediates
from x_transformers.autoregressive_wrapper import map_cache_batch, trim_cached_kv
from x_transformers.x_transformers import Decoder, LayerIntermediates, TransformerWrapper

MODEL_TYPE = "x_transformers"

__all__ = [
    "ByteTokenizer",
    "XTransformersByteTokenizer",
    "XTransformersCache",
    "XTransformersConfig",
    "XTransformersForCausalLM",
    "XTransformersModel",
    "build_transformer_wrapper",
    "export_checkpoint",
    "hf_key",
    "import_checkpoint",
    "load_transformer_wrapper",
    "register",
    "xt_key",
]


# parameter names: gamma / beta never reach transformers

_KEY_RENAMES = (("gamma", "gam_ma"), ("beta", "be_ta"))


def hf_key(name: str) -> str:
    """Our parameter / state-dict name as the transformers model spells it."""
    for ours, theirs in _KEY_RENAMES:
        name = name.replace(ours, theirs)
    return name


def xt_key(name: str) -> str:
    """The inverse of `hf_key`."""
    for ours, theirs in _KEY_RENAMES:
        name = name.replace(theirs, ours)
    return name


_ALIASED_CLASSES: dict = {}


def _aliased_class(cls, renames: tuple):
    # a subclass whose old attribute names read and write the renamed parameters / buffers / submodules, so the
    # module's own forward (`self.gamma`) keeps working
    key = (cls, renames)
    if key not in _ALIASED_CLASSES:
        attrs = {
            old: property(lambda self, n=new: getattr(self, n), lambda self, value, n=new: setattr(self, n, value))
            for old, new in renames
        }
        attrs.update(__module__=cls.__module__, __qualname__=cls.__qualname__)
        _ALIASED_CLASSES[key] = type(cls.__name__, (cls,), attrs)
    return _ALIASED_CLASSES[key]


def _rename_gamma_beta(root: nn.Module):
    """Rename, in place, every parameter, buffer and submodule of `root` whose name holds gamma / beta (`hf_key`)."""
    for name, module in list(root.named_modules()):
        renames = []
        for store in (module._parameters, module._buffers, module._modules):
            # a name already spelled the renamed way would be read back as gamma / beta
            clash = [key for key in store if xt_key(key) != key]
            if clash:
                raise ValueError(f"{name or 'model'}: attribute(s) {clash} would not survive the gamma / beta renaming")
            if not any(hf_key(key) != key for key in store):
                continue
            items = [(hf_key(key), value) for key, value in store.items()]
            renames += [(key, hf_key(key)) for key in store if hf_key(key) != key]
            store.clear()
            store.update(items)
        if renames:
            module._non_persistent_buffers_set = {hf_key(n) for n in module._non_persistent_buffers_set}
            module.__class__ = _aliased_class(type(module), tuple(renames))


def _persist_buffers(root: nn.Module) -> set[str]:
    """Make every buffer part of the state dict; returns the names of those that were not.

    transformers builds the model on the meta device and fills in only what the weights file holds, so buffers our
    modules compute in their constructors (ALiBi slopes, sinusoidal frequencies) are saved with the weights."""
    computed = set()
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        computed |= {prefix + b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None}
        module._non_persistent_buffers_set.clear()
    return computed


# configuration


def _tupled(value):
    # JSON has no tuples; the layer flags that take sequences expect tuples
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    if isinstance(value, dict):
        return {k: _tupled(v) for k, v in value.items()}
    return value


def build_transformer_wrapper(transformer_wrapper: dict, decoder: dict) -> TransformerWrapper:
    """A plain `TransformerWrapper(**transformer_wrapper, attn_layers=Decoder(**decoder))`."""
    return TransformerWrapper(**_tupled(transformer_wrapper), attn_layers=Decoder(**_tupled(decoder)))


_LAYER_TYPES = {"a": "full_attention", "l": "linear_attention"}


class XTransformersConfig(PreTrainedConfig):
    """`wrapper_kwargs`: TransformerWrapper keywords (num_tokens and max_seq_len at least, attn_layers aside);
    `decoder_kwargs`: Decoder keywords. The usual transformers fields are derived from them on construction (the
    names avoid `decoder`, which transformers takes for a sub-configuration)."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache"]

    wrapper_kwargs: dict | None = None
    decoder_kwargs: dict | None = None
    # decoding past max_seq_len slides a window over the last max_seq_len tokens (AutoregressiveWrapper.generate)
    restrict_to_max_seq_len: bool = True
    # what the tokens mean ("bytes" for the byte-level scripts) and how far the weights were trained
    task: str | None = None
    training_step: int | None = None

    # derived from the two specs
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_hidden_layers: int | None = None
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    tie_word_embeddings: bool = False

    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self.wrapper_kwargs = dict(self.wrapper_kwargs or {})
        self.decoder_kwargs = dict(self.decoder_kwargs or {})
        if self.wrapper_kwargs or self.decoder_kwargs:
            self._derive()
        super().__post_init__(**kwargs)

    def _derive(self):
        wrapper, decoder = self.wrapper_kwargs, self.decoder_kwargs
        missing = [key for key in ("num_tokens", "max_seq_len") if key not in wrapper]
        if missing or "attn_layers" in wrapper or "dim" not in decoder:
            raise ValueError(
                "XTransformersConfig needs wrapper_kwargs with num_tokens and max_seq_len (no attn_layers) "
                f"and decoder_kwargs with dim; got wrapper_kwargs={wrapper}, decoder_kwargs={decoder}"
            )
        try:
            json.dumps(wrapper), json.dumps(decoder)
        except TypeError as error:
            raise ValueError(f"the model keywords must be JSON values (no modules or tensors): {error}") from None

        # the layer stack on the meta device: validates the keywords and gives the layer layout, with no memory
        with torch.device("meta"):
            layers = Decoder(**_tupled(decoder))
        executed = [layers.layer_types[i] for i in layers.layers_execute_order]
        self.layer_types = [_LAYER_TYPES[t] for t in executed if t in _LAYER_TYPES]
        mlp = ["sparse" if decoder.get("ff_num_experts") else "dense" for t in executed if t == "f"]
        self.mlp_layer_types = mlp if len(mlp) == len(self.layer_types) else None
        self.num_hidden_layers = len(self.layer_types)
        self.hidden_size = decoder["dim"]
        self.num_attention_heads = layers.heads
        self.vocab_size = wrapper.get("logits_dim") or wrapper["num_tokens"]
        self.max_position_embeddings = wrapper["max_seq_len"]
        self.tie_word_embeddings = bool(wrapper.get("tie_embedding", False))


# cache


_NOT_DECODE_STATE = {"values", "attn_maps_fn"}


def _decode_state(intermediates: LayerIntermediates) -> LayerIntermediates:
    # only what the next cached call reads: the values, attention maps and hiddens of this call would be held on to
    # for nothing
    names = [f.name for f in fields(Intermediates) if f.name not in _NOT_DECODE_STATE]
    layers = []
    for inter in intermediates.attn_intermediates:
        layer = Intermediates()
        for name in names:
            setattr(layer, name, getattr(inter, name, None))
        layers.append(layer)
    return LayerIntermediates(attn_intermediates=layers)


class XTransformersCache(Cache):
    """The decode state of an `XTransformersForCausalLM`: the tokens seen so far (`tokens`, left padding included)
    and our network's cache (`state`, a `LayerIntermediates`: per block the key / values, or a mixer's recurrent and
    convolution states). Built by the model on its first forward with `use_cache`; every tensor is batch-first."""

    def __init__(self):
        super().__init__(layers=[])
        self.tokens: torch.Tensor | None = None
        self.state: LayerIntermediates | None = None

    def __repr__(self):
        shape = tuple(self.tokens.shape) if self.tokens is not None else None
        return f"{type(self).__name__}(tokens={shape}, state={'yes' if self.state is not None else 'no'})"

    def update(self, *args, **kwargs):
        raise NotImplementedError("XTransformersCache is filled by XTransformersForCausalLM itself")

    def set(self, tokens: torch.Tensor, state: LayerIntermediates | None):
        self.tokens, self.state = tokens, state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return -1 if self.tokens is None else self.tokens.shape[0]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.tokens is not None

    @property
    def is_croppable(self) -> bool:
        # key / values can be cut back, a recurrent state cannot be rewound
        return self.state is None or all(
            getattr(inter, "recurrent_state", None) is None and getattr(inter, "hybrid_hidden", None) is None
            for inter in self.state.attn_intermediates
        )

    def _map_batch(self, fn):
        if self.tokens is not None:
            self.tokens = fn(self.tokens)
        if self.state is not None:
            map_cache_batch(self.state, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map_batch(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def batch_repeat_interleave(self, repeats: int):
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self):
        self.tokens, self.state = None, None

    def crop(self, tokens_to_remove: int):
        """Forget the last `-tokens_to_remove` tokens (transformers passes minus the count, as to its own caches)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove == 0 or self.tokens is None:
            return
        if not self.is_croppable:
            raise ValueError("a cache holding recurrent (mixer / hybrid) states cannot be cropped")
        self.tokens = self.tokens[:, : max(self.tokens.shape[1] - remove, 0)]
        if self.state is None:
            return
        # every cached tensor holds positions on dim -2 (fewer than the tokens once a window slid)
        for inter in self.state.attn_intermediates:
            if inter.cached_kv is None:
                continue
            if any(torch.is_tensor(t) and t.shape[-2] <= remove for t in inter.cached_kv):
                # nothing left to continue from: the next call recomputes from the tokens
                self.state = None
                return
            inter.cached_kv = tuple(
                t[..., : t.shape[-2] - remove, :] if torch.is_tensor(t) else t for t in inter.cached_kv
            )


# models


def _padding(attention_mask: torch.Tensor | None, shape) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(seq_start_pos, mask) for an attention mask over the whole sequence: left padding becomes our start
    positions (usable with the cache), any other mask is returned as a bool mask for an uncached forward."""
    if attention_mask is None:
        return None, None
    if attention_mask.ndim != 2 or tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask must be 2-D over every token so far {tuple(shape)}, got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None, None
    start = (~keep).long().cumprod(dim=-1).sum(dim=-1)
    positions = torch.arange(shape[1], device=keep.device)
    if bool((keep == (positions >= start[:, None])).all()):
        return start, None
    return None, keep


class XTransformersPreTrainedModel(PreTrainedModel):
    config_class = XTransformersConfig
    config: XTransformersConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    # the stack hands shared tensors (rotary tables, masks, the tied embedding) from layer to layer: one device
    _no_split_modules = ["TransformerWrapper"]
    # our tied embedding reads the token embedding in the logit projection (one tensor, no lm-head parameter), so
    # there is nothing for transformers to tie
    _tied_weights_keys = {}

    def __init__(self, config: XTransformersConfig):
        super().__init__(config)
        self.model = build_transformer_wrapper(config.wrapper_kwargs, config.decoder_kwargs)
        _rename_gamma_beta(self.model)
        # buffers a plain TransformerWrapper computes itself and leaves out of its state dict
        self._computed_buffers = _persist_buffers(self.model)
        self.post_init()

    def _init_weights(self, module):
        # our modules initialise themselves when built; weights that a loaded file lacks are reported by transformers
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate leaves the cache to the model, which builds an XTransformersCache on its first forward
        return False

    def get_input_embeddings(self):
        return getattr(self.model.token_emb, "emb", self.model.token_emb)

    def load_x_transformers_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a `TransformerWrapper.state_dict()` (our names) into `self.model`."""
        state = {hf_key(k): v for k, v in state_dict.items()}
        own = self.model.state_dict()
        for name in self._computed_buffers:
            state.setdefault(name, own[name])
        return self.model.load_state_dict(state, strict=strict)

    def x_transformers_state_dict(self) -> dict:
        """`self.model`'s weights under our names, as a plain `TransformerWrapper` of this config loads them."""
        return {xt_key(k): v for k, v in self.model.state_dict().items() if k not in self._computed_buffers}

    @classmethod
    def from_transformer_wrapper(cls, net: TransformerWrapper, wrapper_kwargs: dict, decoder_kwargs: dict, **config):
        """This class around a trained `net`, given the keywords it was built with."""
        model = cls(XTransformersConfig(wrapper_kwargs=wrapper_kwargs, decoder_kwargs=decoder_kwargs, **config))
        model.load_x_transformers_state_dict(net.state_dict())
        return model.to(next(net.parameters()).device)

    def to_transformer_wrapper(self) -> TransformerWrapper:
        """A plain `TransformerWrapper` with these weights (our parameter names, no transformers in it)."""
        net = build_transformer_wrapper(self.config.wrapper_kwargs, self.config.decoder_kwargs)
        net.load_state_dict(self.x_transformers_state_dict())
        return net.to(self.device)

    def _run(self, input_ids, attention_mask, cache, use_cache, return_embeddings, inputs_embeds=None):
        """Outputs for `input_ids` (the new tokens when `cache` holds earlier ones), intermediates, and the cache.
        Positions come from the token history, so `position_ids` are not taken."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("the model takes input_ids (it embeds the tokens itself), not inputs_embeds")
        if cache is not None and not isinstance(cache, XTransformersCache):
            raise TypeError(
                f"cache must be an XTransformersCache, got {type(cache).__name__}; leave it out and the model makes one"
            )
        net = self.model
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = XTransformersCache()

        past = cache.tokens if cache is not None else None
        tokens = input_ids if past is None else torch.cat((past.to(input_ids.device), input_ids), dim=1)
        new = input_ids.shape[1]
        seq_start_pos, mask = _padding(attention_mask, tokens.shape)
        state = cache.state if cache is not None and mask is None else None

        # decoding past max_seq_len: the window of the last max_seq_len tokens, as AutoregressiveWrapper.generate
        x = tokens
        if past is not None and self.config.restrict_to_max_seq_len and x.shape[1] > net.max_seq_len:
            dropped = x.shape[1] - net.max_seq_len
            x = x[:, dropped:]
            seq_start_pos = (seq_start_pos - dropped).clamp(min=0) if seq_start_pos is not None else None
            mask = mask[:, dropped:] if mask is not None else None
            keep = net.max_seq_len - new
            # with an absolute positional embedding the cached keys carry positions that no longer apply
            ok = keep > 0 and net.can_cache_kv_outside_max_seq_len
            state = trim_cached_kv(state, keep) if state is not None and ok else None

        kwargs = dict(
            return_intermediates=True, seq_start_pos=seq_start_pos, mask=mask, return_embeddings=return_embeddings
        )
        if state is not None:
            out, intermediates = net(x, cache=state, cache_age=new, **kwargs)
        else:
            out, intermediates = net(x, **kwargs)
            out = out[:, -new:]

        if cache is not None:
            can_continue = net.can_cache_kv and mask is None
            cache.set(tokens, _decode_state(intermediates) if can_continue else None)
        return out, intermediates, cache


class XTransformersModel(XTransformersPreTrainedModel):
    """The network's final hidden states (before the logit projection)."""

    # callers written for transformers 4 pass the cache as past_key_values
    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: XTransformersCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        hidden, intermediates, cache = self._run(input_ids, attention_mask, cache, use_cache, True, inputs_embeds)
        hiddens = tuple(intermediates.layer_hiddens) if output_hidden_states else None
        output = BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache, hidden_states=hiddens)
        return output if return_dict is not False else output.to_tuple()


class XTransformersForCausalLM(XTransformersPreTrainedModel, GenerationMixin):
    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: XTransformersCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """Logits for `input_ids` (only the new tokens' when `cache` holds earlier ones). `labels` (usually the
        input ids; -100 is ignored) give the next-token loss, plus the mixture-of-experts losses as in
        `AutoregressiveWrapper`. `hidden_states` are our `layer_hiddens`: the input of every block, then the
        stack's output before the final norm."""
        logits, intermediates, cache = self._run(input_ids, attention_mask, cache, use_cache, False, inputs_embeds)

        loss = None
        if labels is not None:
            shifted = logits[:, :-1].flatten(0, 1)
            targets = labels[:, 1:].to(logits.device).flatten()
            loss_fn = F.nll_loss if getattr(self.model, "output_is_log_prob", False) else F.cross_entropy
            loss = loss_fn(shifted.float(), targets, ignore_index=-100)
            if intermediates.aux_loss is not None:
                loss = loss + intermediates.aux_loss

        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep > 0 else logits
        else:
            logits = logits[:, logits_to_keep]

        hiddens = tuple(intermediates.layer_hiddens) if output_hidden_states else None
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, hidden_states=hiddens)
        return output if return_dict is not False else output.to_tuple()


# tokenizer


class XTransformersByteTokenizer(PreTrainedTokenizer):
    """Token ids are the bytes of the UTF-8 text (0-255); NUL (id 0) is eos and pad. Decoding turns bytes that are
    not valid UTF-8 into U+FFFD."""

    vocab_files_names = {}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, eos_token="\x00", pad_token="\x00", clean_up_tokenization_spaces=False, **kwargs):
        super().__init__(
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # one token per byte, spelled as the code point of the same number
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str):
        return ord(token) if len(token) == 1 and ord(token) < 256 else None

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(ord(t) for t in "".join(tokens)).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()


# the saved tokenizer_config names the class; the short name is for users
ByteTokenizer = XTransformersByteTokenizer


# registration


def register():
    """Make the Auto classes know the "x_transformers" model type (done on import of this module)."""
    AutoConfig.register(MODEL_TYPE, XTransformersConfig, exist_ok=True)
    AutoModel.register(XTransformersConfig, XTransformersModel, exist_ok=True)
    AutoModelForCausalLM.register(XTransformersConfig, XTransformersForCausalLM, exist_ok=True)
    AutoTokenizer.register(XTransformersConfig, tokenizer_class=XTransformersByteTokenizer, exist_ok=True)


register()


# conversion to and from the training scripts' checkpoints


def _checkpoint_spec(state: dict) -> tuple[dict, dict, dict]:
    """(TransformerWrapper keywords, Decoder keywords, extra config fields) of a training checkpoint, from the model
    configuration it stores (`x_transformers.training.build_model`'s format)."""
    config = state.get("config")
    if not isinstance(config, dict):
        raise ValueError("the checkpoint stores no model configuration (written by an older training script)")
    if config.get("model") != "decoder":
        raise ValueError(f"only decoder checkpoints convert to a causal LM, this one is {config.get('model')!r}")
    wrapper = dict(num_tokens=config["num_tokens"], max_seq_len=config["max_seq_len"], **config.get("wrapper", {}))
    return wrapper, dict(config["decoder"]), dict(task=config.get("task"))


def _strip_prefixes(state_dict: dict) -> dict:
    # the training scripts save the AutoregressiveWrapper (net.) of a possibly compiled module (_orig_mod.)
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module.", "net."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> XTransformersForCausalLM:
    """A training checkpoint (train_enwik8.py's out/checkpoint.pt) as a transformers directory: config, weights
    (safetensors), generation config and, for byte-level models, the tokenizer."""
    from x_transformers import training as T

    state = T.load_checkpoint(checkpoint)
    wrapper, decoder, extra = _checkpoint_spec(state)
    config = XTransformersConfig(
        wrapper_kwargs=wrapper, decoder_kwargs=decoder, training_step=state.get("step"), **extra
    )
    model = XTransformersForCausalLM(config)
    model.load_x_transformers_state_dict(_strip_prefixes(state["model"]))
    model.eval()
    model.save_pretrained(out_dir)
    if wrapper["num_tokens"] == 256:
        ByteTokenizer(model_max_length=wrapper["max_seq_len"]).save_pretrained(out_dir)
    return model


def _read_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def load_transformer_wrapper(directory: str | Path) -> tuple[TransformerWrapper, XTransformersConfig]:
    """A plain `TransformerWrapper` (and its config) from a transformers directory, read without building the
    transformers model."""
    directory = Path(directory)
    config = XTransformersConfig.from_pretrained(directory)
    net = build_transformer_wrapper(config.wrapper_kwargs, config.decoder_kwargs)
    expected = net.state_dict().keys()
    prefix = XTransformersPreTrainedModel.base_model_prefix + "."
    state = {xt_key(k.removeprefix(prefix)): v for k, v in _read_weights(directory).items()}
    # buffers our modules compute themselves were saved along (see _persist_buffers)
    net.load_state_dict({k: v for k, v in state.items() if k in expected})
    return net.eval(), config


def import_checkpoint(directory: str | Path, out: str | Path) -> dict:
    """A transformers directory as a checkpoint of the training scripts' format (weights and model
    configuration), which `x_transformers.training.build_model` and generate.py read."""
    from x_transformers import training as T

    net, config = load_transformer_wrapper(directory)
    wrapper = dict(config.wrapper_kwargs)
    ckpt_config = dict(model="decoder", num_tokens=wrapper.pop("num_tokens"), max_seq_len=wrapper.pop("max_seq_len"))
    ckpt_config["decoder"] = dict(config.decoder_kwargs)
    if wrapper:
        ckpt_config["wrapper"] = wrapper
    if config.task is not None:
        ckpt_config["task"] = config.task
    state = dict(
        model={f"net.{k}": v for k, v in net.state_dict().items()},
        step=config.training_step or 0,
        config=ckpt_config,
    )
    # the checkpoint must rebuild this very model through the training scripts' reader (on the meta device, the
    # weights assigned rather than copied: only keys and shapes are checked)
    try:
        with torch.device("meta"):
            T.build_model(ckpt_config).load_state_dict(state["model"], assign=True)
    except RuntimeError as error:
        raise ValueError(
            f"x_transformers.training.build_model does not rebuild this model from {ckpt_config}: {error}"
        ) from None
    T.save_checkpoint(out, state)
    return state


# command line


def lm_eval_main(argv: list[str]):
    """lm-eval's own command line, with our model classes registered (`--model hf --model_args pretrained=DIR`)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    # our model type is not in transformers' own causal-LM list, which lm-eval consults to pick its backend
    for i, arg in enumerate(argv[:-1]):
        if arg == "--model_args" and "backend=" not in argv[i + 1] and not argv[i + 1].lstrip().startswith("{"):
            argv[i + 1] += ",backend=causal"
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "lm-eval":
        return lm_eval_main(argv[1:])

    parser = argparse.ArgumentParser(prog="python -m x_transformers.hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="training checkpoint -> transformers directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p = sub.add_parser("import", help="transformers directory -> training checkpoint")
    p.add_argument("directory")
    p.add_argument("out")
    sub.add_parser("lm-eval", help="lm-eval's command line with these model classes registered", add_help=False)
    args = parser.parse_args(argv)

    try:
        if args.command == "export":
            model = export_checkpoint(args.checkpoint, args.out_dir)
            n = sum(p.numel() for p in model.parameters())
            print(f"wrote {args.out_dir}: {n / 1e6:.2f}M parameters, layer types {model.config.layer_types}")
        else:
            state = import_checkpoint(args.directory, args.out)
            print(f"wrote {args.out}: {len(state['model'])} tensors, step {state['step']}")
    except (ValueError, OSError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    # run the importable module's main, so that the Auto classes map to x_transformers.hf's classes
    from x_transformers.hf import main as _main

    _main()
