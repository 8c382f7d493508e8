import pytest


@pytest.fixture(scope="session")
def easy_vqa_dir(tmp_path_factory) -> str:
    """The real easy-VQA dataset, built once per test session (~15 s)."""
    from fednano_jax.data.easy_vqa_builder import prepared_builder

    data_dir = str(tmp_path_factory.mktemp("easy_vqa"))
    prepared_builder(data_dir)
    return data_dir


TINY_VOCAB = 40
IMAGE_TOKEN = 4


@pytest.fixture(scope="session")
def tiny_config():
    from fednano_jax.models.llama import LlamaConfig
    from fednano_jax.models.mllm import AdapterConfig, MllmConfig
    from fednano_jax.models.vision import VisionConfig

    return MllmConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2),
        llm=LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2),
        adapter=AdapterConfig(rank=4, alpha=8.0),
        image_token_id=IMAGE_TOKEN,
    )


def make_batch(seed: int, batch: int = 3, length: int = 12, num_image_tokens: int = 4, image_size: int = 16):
    """Right-padded rows `<s> <image>*N text... answer` with loss on the last two real tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(5, TINY_VOCAB, size=(batch, length)).astype(np.int32)
    ids[:, 0] = 2
    ids[:, 1: 1 + num_image_tokens] = IMAGE_TOKEN
    lengths = rng.integers(num_image_tokens + 4, length + 1, size=batch)
    attention = np.arange(length)[None] < lengths[:, None]
    ids = np.where(attention, ids, 0)
    loss = attention & (np.arange(length)[None] >= lengths[:, None] - 2)
    images = rng.integers(0, 256, size=(batch, image_size, image_size, 3)).astype(np.uint8)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, "images": images}
