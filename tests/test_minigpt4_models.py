"""MiniGPT-4's vision side against transformers' reference: EVA ViT-g (HF `Blip2VisionModel`) and the
Q-Former (HF `Blip2QFormerModel` with BLIP-2's query tokens), tiny random configs, weights moved by our
name tables through the loader's `fill_state`."""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fednano_jax.models.eva_vit import EvaVisionTower, EvaVitConfig  # noqa: E402
from fednano_jax.models.qformer import QFormer, QFormerConfig  # noqa: E402
from fednano_jax.weights.fill import fill_state  # noqa: E402
from fednano_jax.weights.names import eva_vit_hf_table, qformer_table  # noqa: E402

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               encoder_hidden_size=48, cross_attention_frequency=2, layer_norm_eps=1e-12, hidden_act="gelu")


def tensors(model, extra=()):
    with torch.no_grad():
        for p in model.parameters():  # HF initialises biases and norms trivially: make every weight count
            p.add_(0.05 * torch.randn_like(p))
    named = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    return list(named.items()) + list(extra)


def test_eva_vit_matches_blip2_vision_model():
    torch.manual_seed(0)
    hf = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**VISION)).eval()
    weights = tensors(hf)
    config = EvaVitConfig(image_size=28, patch_size=7, hidden_size=48, intermediate_size=96, num_layers=3,
                          num_heads=4, layer_norm_eps=1e-6, ln_vision_eps=1e-6)  # HF: one eps for both
    model = nnx.eval_shape(lambda: EvaVisionTower(config, nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    state = fill_state(abstract, eva_vit_hf_table("", "", 3), weights, np.float32, "a BLIP-2 vision model")
    pixels = np.random.default_rng(1).normal(size=(2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = hf(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    got = nnx.merge(graphdef, state)(pixels.transpose(0, 2, 3, 1))
    assert got.shape == (2, 17, 48)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_qformer_matches_blip2_qformer_model_with_its_query_tokens():
    torch.manual_seed(0)
    hf = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**QFORMER)).eval()
    query_tokens = np.random.default_rng(2).normal(size=(1, 5, 32)).astype(np.float32)
    weights = tensors(hf, [("query_tokens", query_tokens)])
    config = QFormerConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, encoder_hidden_size=48,
                           cross_attention_frequency=2, num_query_tokens=5)
    model = nnx.eval_shape(lambda: QFormer(config, nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    state = fill_state(abstract, qformer_table("", "", 3, 2), weights, np.float32, "a BLIP-2 Q-Former")
    image_embeds = np.random.default_rng(3).normal(size=(2, 17, 48)).astype(np.float32)
    with torch.no_grad():
        expected = hf(query_embeds=torch.from_numpy(query_tokens).expand(2, -1, -1),
                      encoder_hidden_states=torch.from_numpy(image_embeds)).last_hidden_state.numpy()
    got = nnx.merge(graphdef, state)(image_embeds)
    assert got.shape == (2, 5, 32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def lavis_vision_names(name: str) -> str:
    """HF BLIP-2 vision names -> LAVIS eva_vit_g.pth names (the inverse of HF's converter)."""
    for hf, lavis in (("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                      ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                      ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
                      ("self_attn.qkv", "attn.qkv")):
        name = name.replace(hf, lavis)
    return name


def test_lavis_checkpoints_load_to_the_same_modules(tmp_path):
    """eva_vit_g.pth (bare keys) and a BLIP-2 .pth ({'model': ...}: ln_vision, Qformer.bert.*, query_tokens),
    written with torch.save from the HF reference's weights, read weights-only, give the HF outputs."""
    import itertools

    from fednano_jax.weights.names import eva_vit_lavis_table
    from fednano_jax.weights.torch_pth import iter_pth

    torch.manual_seed(0)
    vision = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**VISION)).eval()
    qformer = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**QFORMER)).eval()
    vision_weights, qformer_weights = dict(tensors(vision)), dict(tensors(qformer))
    eva = {}
    for name, value in vision_weights.items():
        if name.endswith("self_attn.qkv.bias"):
            third = value.shape[0] // 3
            eva[name.replace("self_attn.qkv.bias", "attn.q_bias").replace("encoder.layers.", "blocks.")] = value[:third]
            eva[name.replace("self_attn.qkv.bias", "attn.v_bias").replace("encoder.layers.", "blocks.")] = value[2 * third:]
        elif not name.startswith("post_layernorm"):
            eva[lavis_vision_names(name)] = value
    query_tokens = np.random.default_rng(2).normal(size=(1, 5, 32)).astype(np.float32)
    blip2 = {"query_tokens": query_tokens, "t5_proj.weight": np.zeros((2, 2), np.float32),  # an extra, ignored
             "ln_vision.weight": vision_weights["post_layernorm.weight"],
             "ln_vision.bias": vision_weights["post_layernorm.bias"]}
    for name, value in qformer_weights.items():
        name = name.replace("layernorm.", "embeddings.LayerNorm.").replace("attention.attention.", "attention.self.")
        blip2["Qformer.bert." + name.replace("crossattention.attention.", "crossattention.self.")] = value
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in eva.items()}, tmp_path / "eva_vit_g.pth")
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in blip2.items()}},
               tmp_path / "blip2.pth")

    def tensors_of(*files):
        return itertools.chain.from_iterable(iter_pth(str(tmp_path / f)) for f in files)

    eva_config = EvaVitConfig(image_size=28, patch_size=7, hidden_size=48, intermediate_size=96, num_layers=3,
                              num_heads=4, layer_norm_eps=1e-6, ln_vision_eps=1e-6)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EvaVisionTower(eva_config, nnx.Rngs(0))))
    eva_state = fill_state(abstract, eva_vit_lavis_table("", 3), tensors_of("eva_vit_g.pth", "blip2.pth"),
                           np.float32, "LAVIS checkpoints")
    pixels = np.random.default_rng(1).normal(size=(2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        image_embeds = vision(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        expected = qformer(query_embeds=torch.from_numpy(query_tokens).expand(2, -1, -1),
                           encoder_hidden_states=image_embeds).last_hidden_state.numpy()
    got_embeds = nnx.merge(graphdef, eva_state)(pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(got_embeds, image_embeds.numpy(), rtol=1e-4, atol=1e-5)
    q_config = QFormerConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, encoder_hidden_size=48,
                             cross_attention_frequency=2, num_query_tokens=5)
    q_graphdef, q_abstract = nnx.split(nnx.eval_shape(lambda: QFormer(q_config, nnx.Rngs(0))))
    q_state = fill_state(q_abstract, qformer_table("Qformer.bert.", "", 3, 2, lavis=True), tensors_of("blip2.pth"), np.float32, "blip2.pth")
    np.testing.assert_allclose(nnx.merge(q_graphdef, q_state)(got_embeds), expected, rtol=1e-4, atol=1e-5)


def test_a_pth_that_is_not_a_state_dict_is_one_sentence(tmp_path):
    from fednano_jax.errors import WeightsError
    from fednano_jax.weights.torch_pth import iter_pth

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match=r"holds a list; expected a state dict"):
        list(iter_pth(str(tmp_path / "list.pth")))
    with pytest.raises(WeightsError, match="no such file"):
        list(iter_pth(str(tmp_path / "missing.pth")))
