"""Images as LLaVA-1.5 feeds them to CLIP: pad to a square with the mean colour, resize, (normalise).

LLaVA-1.5's `image_aspect_ratio="pad"` pastes the image centred on a square canvas
filled with the CLIP mean colour, then CLIPImageProcessor resizes it (bicubic) to the
tower's size; the centre crop is then a no-op. Normalisation happens on device
(`models.vision.normalize_pixels`), so image tables stay uint8.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def mean_colour(image_mean=CLIP_MEAN) -> tuple[int, int, int]:
    """LLaVA's fill colour: tuple(int(x * 255) for x in image_mean)."""
    return tuple(int(x * 255) for x in image_mean)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of `fill` colour (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def llava_image(image: Image.Image, size: int, image_mean=CLIP_MEAN) -> np.ndarray:
    """Any PIL image -> uint8 [size, size, 3]: RGB, padded to a square with the mean colour, bicubic resize."""
    square = expand_to_square(image.convert("RGB"), mean_colour(image_mean))
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def minigpt4_image(image: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> uint8 [size, size, 3] as MiniGPT-4's eval processor: RGB, bicubic resize (no padding)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def prepare_image(image: Image.Image, size: int, pad_to_square: bool = True) -> np.ndarray:
    return llava_image(image, size) if pad_to_square else minigpt4_image(image, size)


def load_llava_image(path: str, size: int, image_mean=CLIP_MEAN) -> np.ndarray:
    with Image.open(path) as image:
        return llava_image(image, size, image_mean)
