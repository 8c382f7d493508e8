"""LAVIS / MiniGPT-4 checkpoints: `torch.save` files (`eva_vit_g.pth`, `blip2_pretrained_flant5xxl.pth`,
`pretrained_minigpt4.pth`), read with torch's weights-only unpickler (no code in the file runs).

torch is needed for this path only, and is imported when a `.pth` is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from fednano_jax.errors import WeightsError


def _torch():
    try:
        import torch
    except ImportError as error:
        raise WeightsError("Reading a .pth checkpoint needs PyTorch (pip install torch); convert it once to "
                           "safetensors where torch is installed, or pass a Hugging Face BLIP-2 directory.") from error
    return torch


def iter_pth(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32-or-native numpy array) for every tensor of a `.pth` state dict, or of its `model` entry
    (how LAVIS saves them)."""
    if not os.path.isfile(path):
        raise WeightsError(f"Expected a .pth checkpoint at {path!r}; no such file.")
    torch = _torch()
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file torch cannot unpickle safely: say which and why
        raise WeightsError(f"{path} is not a weights-only torch checkpoint ({type(error).__name__}: {error}).") \
            from error
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}; expected a state dict (name -> tensor), "
                           "or {'model': state dict} as LAVIS saves.")
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; fill_state casts to the model's dtype
                tensor = tensor.float()
            yield name, tensor.numpy()
