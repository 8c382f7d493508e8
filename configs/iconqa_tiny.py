"""FedNano on IconQA with the small model, CPU-sized: a smoke test of the paper's pipeline.

Needs the authors' release (github.com/lupantech/IconQA) in a local directory:
Run: python -m fednano_jax.main --config=configs/iconqa_tiny.py --config.data.root=DIR
choose_img problems reach the model as one composed image (question image above the labelled choices).
"""

import os
import runpy

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "scienceqa_tiny.py"))["get_config"]()
    config.name = "iconqa_tiny"
    config.data.name = "iconqa"  # partitioned over skills (a multi-skill problem by its first)
    config.data.root = ""  # the release's directory (problems.json, pid_splits.json, pid2skills.json, iconqa/)
    return config
