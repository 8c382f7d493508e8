import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

# The suite runs JAX on this host's CPU. With the compile-only GPU and TPU plugins installed
# (requirements-aot.txt), JAX would otherwise look for those devices in every process the tests start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A one-layer vision tower and LLM: what end-to-end tests of the machinery (not of accuracy) run, to compile fast.
SMALL_MODEL = ("--config.model.llm.hidden_size=32", "--config.model.llm.intermediate_size=64",
               "--config.model.llm.num_layers=1", "--config.model.vision.num_layers=1")


def run_main(*flags, config="configs/easyvqa_tiny.py", timeout=900):
    """`python -m fednano_jax.main` as a user runs it, from the repository root."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "fednano_jax.main", f"--config={config}", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@dataclasses.dataclass(frozen=True)
class Run:
    stdout: str
    workdir: pathlib.Path

    @property
    def results(self) -> dict:
        return json.loads((self.workdir / "results.json").read_text())

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def default_run(easy_vqa_dir, tmp_path_factory) -> Run:
    """The README's default command, run once per session and shared by the end-to-end tests: the shipped
    backbone (an empty cache, so a cached one cannot stand in for it), FedAvg and FedNano, 5 rounds."""
    root = tmp_path_factory.mktemp("default_run")
    result = run_main(f"--config.data.dir={easy_vqa_dir}", f"--config.pretrain.cache_dir={root / 'cache'}",
                      f"--workdir={root / 'run'}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(result.stdout, root / "run")


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
