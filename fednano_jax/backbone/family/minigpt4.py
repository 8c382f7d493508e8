"""The MiniGPT-4 family: BLIP-2's EVA ViT-g (with `ln_vision`) and Q-Former, `llama_proj`, Vicuna; its chat template.

`load_minigpt4(llm, projection, vision, qformer)`: MiniGPT-4 from the checkpoints its users have.

- `llm`: a Vicuna (any LLaMA-family) Hugging Face directory.
- `projection`: `pretrained_minigpt4.pth` (`{"model": {"llama_proj.weight", "llama_proj.bias"}}`), or the
  safetensors file `python -m fednano_jax.convert_pth` made of it.
- `vision`: LAVIS's `eva_vit_g.pth` (or its safetensors), or a Hugging Face BLIP-2 directory.
- `qformer`: BLIP-2's `blip2_pretrained_flant5xxl.pth` (Q-Former, `query_tokens`, `ln_vision`), its
  safetensors, or a BLIP-2 directory; None when `vision` is a BLIP-2 directory (it gives both).

Every shape is read from the files: the EVA width, depth and image size, the Q-Former's layers, its
cross-attention layers and its number of query tokens (`query_tokens`). LAVIS files carry no config, so
their head counts follow from the architectures' head sizes (EVA-CLIP 88, BERT 64). The tokenizer is the
LLM's with `<image>` added; its id is the first past the LLM's vocabulary, where the query embeddings are
spliced (MiniGPT-4 splits the prompt at `<ImageHere>` instead: the same sequence of embeddings).

In an experiment (`model.family = "minigpt4"`, or a config with `model.qformer` or `model.minigpt4`):
`model.path` names Vicuna and `model.minigpt4 = {projection, vision, qformer}` the rest; without
`model.minigpt4`, `model.vision` and `model.qformer` give the shapes (the presets' 7B/13B, or
configs/easyvqa_minigpt4_tiny.py's small one, pretrained here like the tiny family's).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx

from fednano_jax.backbone.family.base import Family, adapter_config
from fednano_jax.backbone.pretrained import PretrainedModel, default_dtype, llama_config, model_part
from fednano_jax.data.images import minigpt4_image
from fednano_jax.data.tokenizer import add_image_token
from fednano_jax.errors import ConfigError, WeightsError
from fednano_jax.models.eva_vit import EvaVitConfig
from fednano_jax.models.minigpt4 import MiniGpt4VisionConfig
from fednano_jax.models.mllm import AdapterConfig, MllmConfig, MultimodalModel, split_model
from fednano_jax.models.qformer import QFormerConfig
from fednano_jax.weights import safetensors_hf, torch_pth
from fednano_jax.weights.fill import fill_state, flatten, unflatten
from fednano_jax.weights.names import CONV, COPY, LINEAR, LLAMA, QKV_Q, QKV_V, find_prefix, layer_norm, linear, \
    llama_table, sources

EVA_HEAD_DIM, BERT_HEAD_DIM = 88, 64
VISION, QFORMER, PROJECTION = "edge/vision/visual_encoder/", "edge/vision/qformer/", "edge/connector/linear"


# ------------------------------------------------ name tables: HF BLIP-2 and LAVIS names -> our NanoEdge
def eva_vit_hf_table(src: str, dst: str, num_layers: int) -> dict[str, tuple[str, str]]:
    """HF `Blip2VisionModel` (under `src`, e.g. `vision_model.`) -> our EvaVisionTower (under `dst`)."""
    table = {f"{dst}patch_embed/kernel": (f"{src}embeddings.patch_embedding.weight", CONV),
             f"{dst}patch_embed/bias": (f"{src}embeddings.patch_embedding.bias", COPY),
             f"{dst}cls_token": (f"{src}embeddings.class_embedding", COPY),
             f"{dst}pos_embed": (f"{src}embeddings.position_embedding", COPY),
             **layer_norm(f"{dst}ln_vision", f"{src}post_layernorm")}
    for i in range(num_layers):
        at, layer = f"{dst}blocks/{i}/", f"{src}encoder.layers.{i}."
        table.update({f"{at}attn/qkv/kernel": (f"{layer}self_attn.qkv.weight", LINEAR),
                      f"{at}attn/q_bias": (f"{layer}self_attn.qkv.bias", QKV_Q),
                      f"{at}attn/v_bias": (f"{layer}self_attn.qkv.bias", QKV_V),
                      **linear(f"{at}attn/proj", f"{layer}self_attn.projection"),
                      **layer_norm(f"{at}norm1", f"{layer}layer_norm1"),
                      **layer_norm(f"{at}norm2", f"{layer}layer_norm2"),
                      **linear(f"{at}fc1", f"{layer}mlp.fc1"), **linear(f"{at}fc2", f"{layer}mlp.fc2")})
    return table


def eva_vit_lavis_table(dst: str, num_layers: int, src: str = "", ln_vision: str = "ln_vision.") -> dict[str, tuple[str, str]]:
    """LAVIS's `eva_vit_g.pth` (keys under `src`, none by default) and BLIP-2's `ln_vision` -> EvaVisionTower."""
    table = {f"{dst}patch_embed/kernel": (f"{src}patch_embed.proj.weight", CONV),
             f"{dst}patch_embed/bias": (f"{src}patch_embed.proj.bias", COPY),
             f"{dst}cls_token": (f"{src}cls_token", COPY), f"{dst}pos_embed": (f"{src}pos_embed", COPY),
             **layer_norm(f"{dst}ln_vision", ln_vision.rstrip("."))}
    for i in range(num_layers):
        at, block = f"{dst}blocks/{i}/", f"{src}blocks.{i}."
        table.update({f"{at}attn/qkv/kernel": (f"{block}attn.qkv.weight", LINEAR),
                      f"{at}attn/q_bias": (f"{block}attn.q_bias", COPY),
                      f"{at}attn/v_bias": (f"{block}attn.v_bias", COPY),
                      **linear(f"{at}attn/proj", f"{block}attn.proj"),
                      **layer_norm(f"{at}norm1", f"{block}norm1"), **layer_norm(f"{at}norm2", f"{block}norm2"),
                      **linear(f"{at}fc1", f"{block}mlp.fc1"), **linear(f"{at}fc2", f"{block}mlp.fc2")})
    return table


def _qformer_attention(dst: str, src: str, inner: str) -> dict[str, tuple[str, str]]:
    return {**linear(f"{dst}/query", f"{src}.{inner}.query"), **linear(f"{dst}/key", f"{src}.{inner}.key"),
            **linear(f"{dst}/value", f"{src}.{inner}.value"), **linear(f"{dst}/dense", f"{src}.output.dense"),
            **layer_norm(f"{dst}/layer_norm", f"{src}.output.LayerNorm")}


def qformer_table(src: str, dst: str, num_layers: int, cross_attention_frequency: int, lavis: bool = False,
                  query_tokens: str = "query_tokens") -> dict[str, tuple[str, str]]:
    """A BLIP-2 Q-Former (under `src`) and its `query_tokens` -> our QFormer. HF's `Blip2QFormerModel`
    (`qformer.` in a BLIP-2 directory) names the attention `attention.attention` and the queries' norm
    `layernorm`; LAVIS (`Qformer.bert.`) names them `attention.self` and `embeddings.LayerNorm`."""
    inner, norm = ("self", "embeddings.LayerNorm") if lavis else ("attention", "layernorm")
    table = {f"{dst}query_tokens": (query_tokens, COPY), **layer_norm(f"{dst}layernorm", f"{src}{norm}")}
    for i in range(num_layers):
        at, layer = f"{dst}layers/{i}/", f"{src}encoder.layer.{i}."
        table.update(_qformer_attention(f"{at}attention", f"{layer}attention", inner))
        if i % cross_attention_frequency == 0:
            table.update(_qformer_attention(f"{at}crossattention", f"{layer}crossattention", inner))
        table.update({**linear(f"{at}intermediate_query", f"{layer}intermediate_query.dense"),
                      **linear(f"{at}output_query", f"{layer}output_query.dense"),
                      **layer_norm(f"{at}output_query_norm", f"{layer}output_query.LayerNorm")})
    return table


# ------------------------------------------------ the files: shapes, layout and weights


def _checked(path: str, what: str) -> str:
    path = os.path.expanduser(str(path))
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith((".pth", ".safetensors"))):
        return path
    raise WeightsError(f"{what}: expected a .pth or .safetensors file or a Hugging Face directory, got {path!r}"
                       f"{'' if os.path.exists(path) else ' (no such file)'}.")


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    return torch_pth.pth_shapes(path) if path.endswith(".pth") else safetensors_hf.tensor_shapes(path)


def iter_tensors(path: str, keep: set[str]):
    """The file's tensors named in `keep` (a BLIP-2 directory's language model is never read)."""
    if path.endswith(".pth"):
        return torch_pth.iter_pth(path, keep)
    return safetensors_hf.iter_tensors(path, keep)


def _hf_config(directory: str):
    import transformers

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise WeightsError(f"{directory} has no config.json; expected a Hugging Face directory.")
    return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)


def _layers(shapes: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.fullmatch(pattern, k))})


def _heads(width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise WeightsError(f"{what} is {width} wide, not a multiple of its architecture's head size {head_dim}; "
                           "pass a Hugging Face BLIP-2 directory, whose config names the head count.")
    return width // head_dim


def _eva_from_lavis(shapes: dict, source: str, dtype) -> tuple[EvaVitConfig, str]:
    """EVA ViT shapes of `eva_vit_g.pth` (bare keys, or under `visual_encoder.` in a whole-model file)."""
    src = find_prefix(shapes, "cls_token", "the EVA class token", source)
    width = shapes[f"{src}cls_token"][-1]
    patch = shapes[f"{src}patch_embed.proj.weight"][-1]
    side = round((shapes[f"{src}pos_embed"][1] - 1) ** 0.5)
    layers = _layers(shapes, re.escape(src) + r"blocks\.(\d+)\.norm1\.weight")
    config = EvaVitConfig(image_size=side * patch, patch_size=patch, hidden_size=width,
                          intermediate_size=shapes[f"{src}blocks.0.mlp.fc1.weight"][0], num_layers=len(layers),
                          num_heads=_heads(width, EVA_HEAD_DIM, f"The EVA ViT in {source}"), dtype=jnp.dtype(dtype).name)
    return config, src


def _qformer_from_lavis(shapes: dict, source: str) -> tuple[QFormerConfig, str]:
    src = find_prefix(shapes, "embeddings.LayerNorm.weight", "the Q-Former's query LayerNorm", source)
    if "query_tokens" not in shapes:
        raise WeightsError(f"No tensor named 'query_tokens' (the Q-Former's learned queries) in {source}.")
    queries = shapes["query_tokens"]
    layer = re.escape(src) + r"encoder\.layer\.(\d+)\."
    layers = _layers(shapes, layer + r"attention\.self\.query\.weight")
    cross = _layers(shapes, layer + r"crossattention\.self\.key\.weight")
    if not layers or not cross:
        raise WeightsError(f"{source} holds no Q-Former layers with cross-attention under {src!r}.")
    frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    return QFormerConfig(hidden_size=queries[-1], num_layers=len(layers),
                         num_heads=_heads(queries[-1], BERT_HEAD_DIM, f"The Q-Former in {source}"),
                         intermediate_size=shapes[f"{src}encoder.layer.0.intermediate_query.dense.weight"][0],
                         encoder_hidden_size=shapes[f"{src}encoder.layer.{cross[0]}.crossattention.self.key.weight"][1],
                         cross_attention_frequency=frequency, num_query_tokens=queries[1]), src


def _blip2_directory(directory: str, dtype) -> tuple[EvaVitConfig, QFormerConfig]:
    """A Hugging Face BLIP-2 directory's vision and Q-Former shapes (query count from `query_tokens`)."""
    hf = _hf_config(directory)
    if hf.model_type != "blip-2":
        raise WeightsError(f"{directory} holds a {hf.model_type!r} model; expected a BLIP-2 directory "
                           "(model_type 'blip-2') for MiniGPT-4's vision side.")
    v, q = hf.vision_config, hf.qformer_config
    queries = safetensors_hf.tensor_shapes(directory).get("query_tokens")
    if queries is None:
        raise WeightsError(f"No tensor named 'query_tokens' in {directory}.")
    eva = EvaVitConfig(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                       intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
                       num_heads=v.num_attention_heads, layer_norm_eps=v.layer_norm_eps,
                       ln_vision_eps=v.layer_norm_eps, dtype=jnp.dtype(dtype).name)  # HF: one eps for both
    qformer = QFormerConfig(hidden_size=q.hidden_size, num_layers=q.num_hidden_layers, num_heads=q.num_attention_heads,
                            intermediate_size=q.intermediate_size, encoder_hidden_size=q.encoder_hidden_size,
                            cross_attention_frequency=q.cross_attention_frequency, num_query_tokens=queries[1],
                            layer_norm_eps=q.layer_norm_eps)
    return eva, qformer


def vision_layout(vision: str, qformer: str | None, dtype):
    """-> (MiniGpt4VisionConfig, name table, sources to stream) of the vision side's files."""
    if qformer is None:
        if not os.path.isdir(vision):
            raise WeightsError(f"qformer=None needs vision to be a Hugging Face BLIP-2 directory (it holds both); "
                               f"{vision} is a file: pass BLIP-2's .pth as qformer.")
        qformer = vision
    if os.path.isdir(vision):
        eva, hf_qformer = _blip2_directory(vision, dtype)
        table = eva_vit_hf_table("vision_model.", VISION, eva.num_layers)
    else:
        eva, src = _eva_from_lavis(tensor_shapes(vision), vision, dtype)
        table = eva_vit_lavis_table(VISION, eva.num_layers, src=src)
    if os.path.isdir(qformer):
        q = hf_qformer if qformer == vision else _blip2_directory(qformer, dtype)[1]
        table.update(qformer_table("qformer.", QFORMER, q.num_layers, q.cross_attention_frequency))
    else:
        shapes = tensor_shapes(qformer)
        q, src = _qformer_from_lavis(shapes, qformer)
        table.update(qformer_table(src, QFORMER, q.num_layers, q.cross_attention_frequency, lavis=True))
        if not os.path.isdir(vision) and "ln_vision.weight" not in shapes:  # a directory has post_layernorm
            raise WeightsError(f"No tensor named 'ln_vision.weight' in {qformer}; expected BLIP-2's checkpoint "
                               "(it holds ln_vision, the Q-Former and query_tokens).")
    if q.encoder_hidden_size != eva.hidden_size:
        raise WeightsError(f"The Q-Former in {qformer} reads {q.encoder_hidden_size}-wide image tokens but the "
                           f"EVA ViT in {vision} is {eva.hidden_size} wide.")
    return MiniGpt4VisionConfig(eva, q), table, list(dict.fromkeys([vision, qformer]))


def _with_grown_embeddings(mcfg: MllmConfig, table, tensors, dtype, source: str, seed: int, model=MultimodalModel):
    """-> (graphdef, frozen, adapters) of `model` (the whole model, or a part alone): the checkpoints' weights,
    the embedding table grown by a zero row for `<image>` (replaced by image embeddings wherever it stands),
    NanoAdapters at identity."""
    plain = dataclasses.replace(mcfg, embed_vocab_size=None)
    _, abstract_plain, _ = split_model(nnx.eval_shape(lambda: model(plain, nnx.Rngs(seed))))
    params = flatten(nnx.to_pure_dict(fill_state(abstract_plain, table, tensors, dtype, source)))
    if "edge/embed_tokens/embedding" in params:  # not in the decoder alone
        embedding = params["edge/embed_tokens/embedding"]
        params["edge/embed_tokens/embedding"] = jnp.pad(embedding, ((0, mcfg.embed_vocab_size - embedding.shape[0]),
                                                                    (0, 0)))
    graphdef, abstract, _ = split_model(nnx.eval_shape(lambda: model(mcfg, nnx.Rngs(seed))))
    frozen = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(frozen, unflatten(params, nnx.to_pure_dict(abstract)))
    # Under jit only the adapter initialisers survive dead-code elimination: no backbone is allocated twice.
    adapters = jax.jit(lambda: split_model(model(mcfg, nnx.Rngs(seed)))[2])()
    return graphdef, frozen, adapters


def _tokenizer(directory: str, image_token_id: int):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if add_image_token(tokenizer) != image_token_id:
        raise WeightsError(f"The tokenizer in {directory} has {len(tokenizer) - 1} tokens but the LLM's vocabulary "
                           f"is {image_token_id}; expected them to agree (so <image> takes id {image_token_id}).")
    return tokenizer


def minigpt4_config(llm: str, vision: str, qformer: str | None = None, dtype=None,
                    adapter: AdapterConfig | None = None) -> tuple[MllmConfig, dict, list[str]]:
    """-> (model config, name table, files to stream) from the checkpoints' metadata (no tensor is read,
    beyond a .pth file's memory map)."""
    dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
    hf = _hf_config(llm)
    text = llama_config(hf, dtype)
    vcfg, table, files = vision_layout(vision, qformer, dtype)
    table.update(llama_table(LLAMA, text.num_layers, hf.tie_word_embeddings))
    mcfg = MllmConfig(vcfg, text, adapter or AdapterConfig(), image_token_id=text.vocab_size, connector="linear",
                      embed_vocab_size=text.vocab_size + 1, decoder=MiniGpt4.decoder)
    return mcfg, table, [llm, *files]


def files_of(config) -> dict:
    """config.model.minigpt4 = {projection, vision, qformer} (qformer may be empty) as load_minigpt4's
    keyword arguments, checked: a missing file is one sentence."""
    section = config.model.minigpt4
    files = {"projection": _checked(section.projection, "model.minigpt4.projection"),
             "vision": _checked(section.vision, "model.minigpt4.vision")}
    qformer = section.qformer if "qformer" in section else None  # optional: the Q-Former inside the vision file
    files["qformer"] = _checked(qformer, "model.minigpt4.qformer") if qformer else None
    return files


def config_of_files(config) -> MllmConfig:
    """The model config that config.model.path (Vicuna) and config.model.minigpt4's files describe."""
    files = files_of(config)
    return minigpt4_config(_checked(config.model.path, "model.path"), files["vision"], files["qformer"],
                           config.model.dtype)[0]


def load_minigpt4(llm, projection, vision, qformer=None, dtype=None, adapter: AdapterConfig | None = None,
                  seed: int = 0, part: str = "whole") -> PretrainedModel:
    """MiniGPT-4 as our split model: EVA ViT, Q-Former and `llama_proj` with A_I on the projected queries,
    Vicuna's embeddings with A_T, and Vicuna on the server. `dtype` defaults to bf16 on GPU/TPU, fp32 on CPU.
    `part` as load_pretrained's: "edge" reads of Vicuna only its embeddings, "server" only Vicuna's decoder."""
    llm = _checked(llm, "llm")
    projection, vision = _checked(projection, "projection"), _checked(vision, "vision")
    qformer = None if qformer is None else _checked(qformer, "qformer")
    dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
    mcfg, table, files = minigpt4_config(llm, vision, qformer, dtype, adapter)
    table.update({f"{PROJECTION}/kernel": ("llama_proj.weight", LINEAR),
                  f"{PROJECTION}/bias": ("llama_proj.bias", COPY)})
    model, table = model_part(table, part)
    files = list(dict.fromkeys([*files, projection]))
    keep = sources(table)
    tensors = (item for path in files for item in iter_tensors(path, keep))
    graphdef, frozen, adapters = _with_grown_embeddings(mcfg, table, tensors, dtype, " + ".join(files), seed, model)
    return PretrainedModel(mcfg, graphdef, frozen, adapters, llm,
                           functools.partial(_tokenizer, llm, mcfg.image_token_id), MiniGpt4.name)


# ------------------------------------------------ the registry entry
class MiniGpt4(Family):
    name = "minigpt4"
    prompt = "minigpt4"  # "###Human: <Img><image></Img> {question} ###Assistant:", answers end with ###

    def check(self, config) -> None:
        super().check(config)
        model = config.model
        if not model.qformer and not model.minigpt4:
            raise ConfigError("model.family='minigpt4' needs model.qformer (with model.vision: the shapes of its EVA "
                              "ViT and Q-Former) or model.minigpt4 (MiniGPT-4's files beside Vicuna at model.path).")
        if model.qformer:
            self.vision_config(config)  # its checks

    def vision_config(self, config) -> MiniGpt4VisionConfig:
        """The EVA ViT (model.vision) and Q-Former (model.qformer) of the config's sections."""
        m = config.model
        v, q = m.vision, m.qformer
        if m.connector != "linear":
            raise ConfigError(f"A MiniGPT-4 model (model.family='minigpt4') projects with one linear layer "
                              f"(llama_proj): model.connector must be 'linear', got {m.connector!r}.")
        eva = EvaVitConfig(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_layers=v.num_layers, num_heads=v.num_heads,
                           dtype=m.dtype)
        qformer = QFormerConfig(hidden_size=q.hidden_size, num_layers=q.num_layers, num_heads=q.num_heads,
                                intermediate_size=q.intermediate_size, encoder_hidden_size=v.hidden_size,
                                cross_attention_frequency=q.cross_attention_frequency,
                                num_query_tokens=q.num_query_tokens)
        return MiniGpt4VisionConfig(eva, qformer)

    def checkpoint_metadata(self, config) -> MllmConfig:
        """With model.minigpt4: the config Vicuna (model.path) and MiniGPT-4's files describe; without, Vicuna's
        alone (a text-only LLM, to which the config's EVA ViT and Q-Former are aligned)."""
        if not config.model.minigpt4:
            return super().checkpoint_metadata(config)
        return dataclasses.replace(config_of_files(config), adapter=adapter_config(config))

    def load(self, config, part: str = "whole") -> PretrainedModel:
        if not config.model.minigpt4:
            return super().load(config, part)
        return load_minigpt4(config.model.path, **files_of(config), dtype=config.model.dtype,
                             adapter=adapter_config(config), seed=config.pretrain.seed, part=part)

    def prepare_image(self, image, vision):
        """MiniGPT-4's eval processor: bicubic-resized, no padding."""
        return minigpt4_image(image, vision.image_size)


FAMILY = MiniGpt4()
