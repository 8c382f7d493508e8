"""A text-only checkpoint LLM as an experiment's backbone: its LLM stays as loaded, a vision side is aligned and cached."""

import os

import numpy as np
import pytest

from fednano_jax.backbone.from_checkpoint import VISION_SIDE, attach_vision_tower, checkpoint_backbone
from fednano_jax.data import pipeline
from fednano_jax.config import load_config_file, read
from fednano_jax.backbone.pretrained import load_pretrained
from fednano_jax.weights.fill import flatten

torch = pytest.importorskip("torch", reason="the checkpoint is written with transformers' PyTorch LLaMA")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def splits(easy_vqa_dir):
    return pipeline.load_splits(easy_vqa_dir, pretrain_images=40, train_examples=40, test_examples=20, seed=0,
                                image_size=32)


def save_llama_with_tokenizer(directory, tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer) + 3, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def experiment_config(path, cache_dir):
    config = load_config_file("configs/easyvqa_smollm2.py")
    config.model.path = str(path)
    config.model.vision.update(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_layers=2,
                               num_heads=2)
    config.model.adapter.rank = 4
    config.pretrain.update(steps=4, batch_size=8, cache_dir=str(cache_dir))
    config.data.pretrain_images = 40
    return read(config, run=False)


def parameters(state) -> dict:
    from flax import nnx

    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(state)).items()}


def test_llm_stays_as_loaded_and_the_aligned_vision_side_is_cached(tmp_path, splits):
    checkpoint = tmp_path / "llm"
    save_llama_with_tokenizer(checkpoint, pipeline.tokenizer_for(splits))
    config = experiment_config(checkpoint, tmp_path / "cache")
    _, frozen, adapters, tokenizer, mcfg = checkpoint_backbone(config, splits)
    assert mcfg.vision.num_image_tokens == 4 and tokenizer.convert_tokens_to_ids("<image>") == mcfg.image_token_id
    aligned = parameters(frozen)
    loaded = parameters(load_pretrained(str(checkpoint), dtype="float32").frozen)
    for name, value in loaded.items():  # the LLM (embeddings included) is not trained by the alignment
        np.testing.assert_array_equal(aligned[name][: value.shape[0]], value, err_msg=name)
    vision_side = set(aligned) - set(loaded)
    assert vision_side and all(k.startswith(VISION_SIDE) for k in vision_side)
    _, fresh, _ = attach_vision_tower(load_pretrained(str(checkpoint), dtype="float32"), mcfg, config.pretrain.seed)
    fresh = parameters(fresh)
    assert any(not np.array_equal(fresh[k], aligned[k]) for k in vision_side)  # the alignment trained them
    assert len(os.listdir(tmp_path / "cache")) == 1
    _, again, _, _, _ = checkpoint_backbone(config, splits)  # from the cache: the same vision side
    for name, value in parameters(again).items():
        np.testing.assert_array_equal(value, aligned[name], err_msg=name)
