"""`python -m fednano_jax.convert_pth --pth=eva_vit_g.pth,blip2_pretrained_flant5xxl.pth,pretrained_minigpt4.pth`

Converts LAVIS / MiniGPT-4 `torch.save` checkpoints once into safetensors files with the same tensor names
(a `{"model": ...}` wrapper is unwrapped; bfloat16 becomes float32, which numpy can hold), written beside
each file or into `--out_dir`. `load_minigpt4` and `model.minigpt4` take either form; the safetensors
one needs no torch.
"""

from __future__ import annotations

import os

from absl import flags
from safetensors.numpy import save_file
from tqdm import tqdm

from fednano_jax.errors import WeightsError
from fednano_jax.weights.torch_pth import iter_pth

FLAGS = flags.FLAGS


def converted_path(pth: str, out_dir: str | None) -> str:
    stem = os.path.splitext(os.path.basename(pth))[0]
    return os.path.join(out_dir or os.path.dirname(os.path.abspath(pth)), stem + ".safetensors")


def convert(pth: str, out_dir: str | None = None) -> str:
    """-> the path written. The file is staged and renamed, so an interrupted conversion leaves nothing."""
    if not pth.endswith(".pth"):
        raise WeightsError(f"Expected a .pth file to convert, got {pth!r}.")
    tensors = {name: array for name, array in tqdm(iter_pth(pth), desc=f"reading {os.path.basename(pth)}",
                                                   unit="tensor", leave=False)}
    out = converted_path(pth, out_dir)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out + ".partial")
    os.replace(out + ".partial", out)
    return out


def main() -> None:
    for pth in FLAGS.pth:
        out = convert(os.path.expanduser(pth), FLAGS.out_dir and os.path.expanduser(FLAGS.out_dir))
        print(f"Wrote {out} ({os.path.getsize(out) / 2**20:,.1f} MiB)")


def define_flags() -> None:
    flags.DEFINE_list("pth", None, "The .pth checkpoints to convert.")
    flags.DEFINE_string("out_dir", None, "Where to write the .safetensors files (default: beside each .pth).")
    flags.mark_flag_as_required("pth")
