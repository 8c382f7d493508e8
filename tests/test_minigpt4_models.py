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
from fednano_jax.weights.names import eva_vit_hf_table, qformer_hf_table  # noqa: E402

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
    state = fill_state(abstract, qformer_hf_table("", "", 3, 2), weights, np.float32, "a BLIP-2 Q-Former")
    image_embeds = np.random.default_rng(3).normal(size=(2, 17, 48)).astype(np.float32)
    with torch.no_grad():
        expected = hf(query_embeds=torch.from_numpy(query_tokens).expand(2, -1, -1),
                      encoder_hidden_states=torch.from_numpy(image_embeds)).last_hidden_state.numpy()
    got = nnx.merge(graphdef, state)(image_embeds)
    assert got.shape == (2, 5, 32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
