"""GGUF files with general.architecture = llama: hyperparameters, tensors under Hugging Face names.

Tensors are dequantized with the `gguf` package one at a time (F32, F16, BF16, Q8_0,
Q4_0, Q4_1 and the other types it implements). llama.cpp's converter permutes the
rows of the Q and K projections (interleaved rotary pairs); `unpermute` restores
Hugging Face's rotate-half layout.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator

import numpy as np

from fednano_jax.errors import WeightsError

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str | None:
    """GGUF tensor name -> Hugging Face LLaMA name (None for tensors we do not use)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def open_reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise WeightsError(f"{path} is not a readable GGUF file ({error}).") from error


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        if default is None:
            raise WeightsError(f"GGUF metadata key {key!r} is missing; expected a llama.cpp-converted LLaMA model.")
        return default
    return field.contents()


def hyperparameters(reader) -> dict:
    """The LLaMA hyperparameters, named as Hugging Face's LlamaConfig names them."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"GGUF general.architecture is {arch!r}; only 'llama' (LLaMA, Vicuna, TinyLlama, "
                           "SmolLM2, ...) is supported.")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return dict(
        vocab_size=int(embed.shape[1]),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
    )


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)`: per head, interleaved pairs back to two halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation, HF rotate-half rows -> interleaved pairs (tests write GGUF with it)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor) -> np.ndarray:
    import gguf

    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise WeightsError(f"GGUF tensor {tensor.name!r} uses quantization type {tensor.tensor_type.name}, "
                           "which the gguf package cannot dequantize; supported: F32, F16, BF16, Q8_0, Q4_0, "
                           "Q4_1, Q5_0, Q5_1 and the K-quants.") from error


def iter_tensors(reader, hparams: dict, keep: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array in torch layout [out, in]) one tensor at a time; with `keep`, only the
    tensors it names (by their Hugging Face names) are dequantized."""
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None or (keep is not None and name not in keep):
            continue
        weight = np.asarray(_dequantize(tensor), np.float32)
        if name.endswith("q_proj.weight"):
            weight = unpermute(weight, hparams["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute(weight, hparams["num_key_value_heads"])
        yield name, weight
