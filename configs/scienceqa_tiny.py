"""FedNano on ScienceQA with the small model (easyvqa_tiny's), CPU-sized: a smoke test of the paper's pipeline.

Needs the authors' release (github.com/lupantech/ScienceQA) or its HF parquet mirror in a local directory:
Run: python -m fednano_jax.main --config=configs/scienceqa_tiny.py --config.data.root=DIR
     [--config.data.format=parquet]
The backbone is pretrained on data.pretrain_examples held-aside train problems (text-only problem -> letter,
and "describe the image." -> the correct answer's text); the clients get data.train_examples problems.
"""

import os
import runpy

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "easyvqa_tiny.py"))["get_config"]()
    config.name = "scienceqa_tiny"
    config.data = ConfigDict(dict(
        name="scienceqa",
        root="",  # the release's directory (problems.json, pid_splits.json, images/) or the parquet files'
        format="official",  # or "parquet" (derek-thomas/ScienceQA)
        dir="~/.cache/fednano_jax/tfds",  # the tfds build of the release goes here
        pretrain_examples=2000,  # train problems held aside for backbone pretraining only (at most half the split)
        train_examples=400,  # federated training problems from the rest of the train split (0 = all)
        test_examples=200,  # federated test (and validation) problems from the official splits (0 = all)
        dirichlet_alpha=1.0,  # non-IID skew over ScienceQA's topics
    ))
    config.pretrain = ConfigDict({k: v for k, v in config.pretrain.items() if k != "questions_per_image"})
    config.pretrain.steps = 300
    config.pretrain.caption_repeats = 1  # caption-like examples per held-aside image problem
    config.eval.batch_size = 100
    config.eval.max_new_tokens = 4
    return config
