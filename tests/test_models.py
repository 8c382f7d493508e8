import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import IMAGE_TOKEN, make_batch
from fednano_jax.eval.generate import full_recompute_generate, greedy_generate
from fednano_jax.models.llama import rotary
from fednano_jax.models.mllm import MultimodalModel, merge_model, splice_image_features, split_model
from fednano_jax.models.nano_adapter import AdapterParam, NanoAdapter
from fednano_jax.models.vision import VisionConfig, VisionTower


def randomize(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_untrained_adapters_leave_logits_unchanged(tiny_config):
    import dataclasses

    batch = make_batch(0)
    with_adapters = MultimodalModel(tiny_config, nnx.Rngs(0))
    plain_config = dataclasses.replace(tiny_config, adapter=dataclasses.replace(tiny_config.adapter, image=False,
                                                                                 text=False))
    without = MultimodalModel(plain_config, nnx.Rngs(0))
    nnx.update(without, nnx.state(with_adapters, nnx.Not(AdapterParam)))
    args = (batch["input_ids"], batch["attention_mask"], batch["images"])
    np.testing.assert_array_equal(with_adapters(*args), without(*args))
    # ... and a trained one does change them.
    graphdef, frozen, adapters = split_model(with_adapters)
    trained = merge_model(graphdef, frozen, randomize(adapters, 1))
    assert not np.allclose(trained(*args), without(*args), atol=1e-4)


def test_adapter_is_residual_low_rank():
    adapter = NanoAdapter(8, 2, alpha=4.0, rngs=nnx.Rngs(0))
    adapter.up[...] = jnp.ones((2, 8))
    x = jnp.arange(16.0).reshape(2, 8)
    expected = x + 2.0 * (x @ adapter.down[...]) @ jnp.ones((2, 8))
    np.testing.assert_allclose(adapter(x), expected, rtol=1e-6)
    assert isinstance(adapter.down, AdapterParam) and adapter.down.shape == (8, 2)


def test_image_features_are_spliced_at_image_tokens():
    ids = jnp.array([[2, 4, 4, 7, 0], [2, 9, 9, 9, 9]])
    text = jnp.zeros((2, 5, 3))
    features = jnp.array([[[1.0] * 3, [2.0] * 3], [[5.0] * 3, [6.0] * 3]])
    out = splice_image_features(text, features, ids == 4)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(out[1, :, 0], [0, 0, 0, 0, 0])  # a text-only row takes no image feature


def test_vision_tower_selects_layer_and_drops_class_token():
    config = VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=3,
                          num_heads=2, feature_layer=-2)
    tower = VisionTower(config, nnx.Rngs(0))
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    features = tower(images)
    assert features.shape == (2, 4, 16)
    last = VisionTower(VisionConfig(**{**config.__dict__, "feature_layer": -1}), nnx.Rngs(0))
    assert not np.allclose(last(images), features)
    # feature_layer=-2 of 3 layers is hidden_states[2]: the output of 2 layers.
    two_layers = VisionTower(VisionConfig(**{**config.__dict__, "num_layers": 2, "feature_layer": -1}), nnx.Rngs(0))
    weights = nnx.to_pure_dict(nnx.state(tower))
    weights["layers"].pop(2)
    state = nnx.state(two_layers)
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(two_layers, state)
    np.testing.assert_allclose(two_layers(images), features, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expects images of shape"):
        tower(images[:, :8])


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
    score = lambda pq, pk: jnp.sum(rotary(q, jnp.array([[pq]]), 10000.0) * rotary(k, jnp.array([[pk]]), 10000.0))
    np.testing.assert_allclose(score(5, 3), score(12, 10), rtol=1e-5)
    np.testing.assert_allclose(rotary(q, jnp.array([[0]]), 10000.0), q)


def test_padding_does_not_change_real_tokens_logits(tiny_config):
    model = MultimodalModel(tiny_config, nnx.Rngs(0))
    batch = make_batch(1, batch=1, length=10)
    n = int(batch["attention_mask"].sum())
    short = model(batch["input_ids"][:, :n], batch["attention_mask"][:, :n], batch["images"])
    padded = model(batch["input_ids"], batch["attention_mask"], batch["images"])
    np.testing.assert_allclose(padded[:, :n], short, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_recomputation(tiny_config):
    model = MultimodalModel(tiny_config, nnx.Rngs(3))
    graphdef, frozen, adapters = split_model(model)
    adapters = randomize(adapters, 4)
    model = merge_model(graphdef, frozen, adapters)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, size=(3, 9)).astype(np.int32)
    ids[:, 1:5] = IMAGE_TOKEN
    mask = np.ones_like(ids, bool)
    mask[1, :3] = False  # left padding, as evaluation prompts are
    mask[2, :1] = False
    ids = np.where(mask, ids, 0)
    images = rng.integers(0, 256, size=(3, 16, 16, 3)).astype(np.uint8)
    cached = greedy_generate(graphdef, frozen, adapters, ids, mask, images, max_new_tokens=5, pad_id=0, eos_id=-1)
    reference = full_recompute_generate(model, ids, mask, images, max_new_tokens=5)
    np.testing.assert_array_equal(cached, reference)


def test_generation_pads_after_eos(tiny_config):
    model = MultimodalModel(tiny_config, nnx.Rngs(3))
    graphdef, frozen, adapters = split_model(model)
    batch = make_batch(2)
    first = greedy_generate(graphdef, frozen, adapters, batch["input_ids"], batch["attention_mask"],
                            batch["images"], max_new_tokens=3, pad_id=0, eos_id=-1)
    eos = int(first[0, 0])
    stopped = greedy_generate(graphdef, frozen, adapters, batch["input_ids"], batch["attention_mask"],
                              batch["images"], max_new_tokens=3, pad_id=0, eos_id=eos)
    assert int(stopped[0, 0]) == eos and np.all(np.asarray(stopped[0, 1:]) == 0)


def test_stacked_decoder_layers_equal_the_layers_applied_in_turn(tiny_config):
    """The scan over the stacked layers computes what applying layer 0, then 1, ... does, under any remat."""
    import dataclasses

    from fednano_jax.models.llama import LlamaDecoder, positions_from_mask

    llm = dataclasses.replace(tiny_config.llm, num_layers=3)
    decoder = LlamaDecoder(llm, nnx.Rngs(0))
    assert jax.tree.leaves(nnx.state(decoder.layers))[0].shape[0] == 3
    embeds = jax.random.normal(jax.random.key(1), (2, 6, llm.hidden_size))
    attention_mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)
    mask = jnp.tril(jnp.ones((6, 6), bool))[None] & attention_mask.astype(bool)[:, None, :]
    graphdef, state = nnx.split(decoder.layers)
    x = embeds
    for i in range(3):
        x = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[i], state))(x, positions_from_mask(attention_mask),
                                                                            mask)[0]
    expected = decoder.norm(x)
    for policy in ("none", "full"):
        decoder.config = dataclasses.replace(llm, remat=policy)
        np.testing.assert_allclose(decoder.hidden_states(embeds, attention_mask), expected, rtol=1e-5, atol=1e-6)


def test_a_backbone_saved_per_layer_loads_with_its_layers_stacked(tmp_path, tiny_config):
    """Backbones cached (or shipped) before the decoder layers were stacked still load, stacked as they load."""
    from fednano_jax.backbone.cache import load_backbone, save_backbone
    from fednano_jax.data.tokenizer import build_tokenizer

    _, frozen, _ = split_model(MultimodalModel(tiny_config, nnx.Rngs(0)))
    pure = nnx.to_pure_dict(frozen)
    layers = pure["server"]["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    per_layer = {**pure, "server": {**pure["server"],
                                    "layers": {str(i): jax.tree.map(lambda x: x[i], layers) for i in range(count)}}}
    save_backbone(str(tmp_path / "old"), per_layer, build_tokenizer(["a b"]))
    loaded = nnx.to_pure_dict(load_backbone(str(tmp_path / "old"), frozen))
    jax.tree.map(np.testing.assert_array_equal, loaded, pure)
