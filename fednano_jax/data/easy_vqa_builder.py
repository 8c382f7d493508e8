"""easy-VQA as a tensorflow-datasets array_record builder, one record per image.

The source is the offline PyPI package `easy_vqa` (64x64 PNGs and a questions JSON per
split). Images are stored as uint8 Tensor features because `tfds.features.Image` needs
TensorFlow, which this project does not install; as their raw bytes, since a Tensor stored as a list of integers
takes tfds' numpy parser about 0.4 ms an image to read back (2 s of every run), its bytes 0.05 ms.
"""

import collections
import dataclasses
import os
from collections.abc import Iterator

import easy_vqa
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fednano_jax.errors import DataError  # noqa: F401 - re-exported for existing imports

IMAGE_SHAPE = (64, 64, 3)
SPLITS = ("train", "test")

_QUESTIONS = {"train": easy_vqa.get_train_questions, "test": easy_vqa.get_test_questions}
_IMAGE_PATHS = {"train": easy_vqa.get_train_image_paths, "test": easy_vqa.get_test_image_paths}


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    image_id: int
    image: np.ndarray = dataclasses.field(repr=False, compare=False)
    questions: tuple[str, ...]
    answers: tuple[str, ...]


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _questions_by_image(split: str) -> dict[int, list[tuple[str, str]]]:
    grouped = collections.defaultdict(list)
    for text, answer, image_id in zip(*_QUESTIONS[split]()):
        grouped[image_id].append((text, answer))
    return grouped


class EasyVqa(tfds.core.GeneratorBasedBuilder):
    """easy-VQA (Zhou, 2020): one coloured shape per image, 13 answers; one record per image."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "One record per image with all its questions.",
                     "1.1.0": "Images stored as their bytes: the same records, read back 8x faster."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
                "image_id": tfds.features.Scalar(dtype=np.int64),
                "questions": tfds.features.Sequence(tfds.features.Text()),
                "answers": tfds.features.Sequence(tfds.features.Text()),
            }),
            homepage="https://github.com/vzhou842/easy-VQA",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships inside the installed easy_vqa package.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        image_paths = _IMAGE_PATHS[split]()
        for image_id, pairs in sorted(_questions_by_image(split).items()):
            questions, answers = zip(*pairs)
            yield image_id, {
                "image": _read_png(image_paths[image_id]),
                "image_id": image_id,
                "questions": list(questions),
                "answers": list(answers),
            }


def _check_data_dir(data_dir: str) -> None:
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"data.dir {data_dir!r} is a file; expected a directory where easy-VQA is (or will be) built.")
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as error:
        raise DataError(f"data.dir {data_dir!r} cannot be created ({error.strerror}); expected a writable "
                        "directory where easy-VQA is (or will be) built.") from error
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise DataError(f"data.dir {data_dir!r} is not readable; expected a directory where easy-VQA is built.")


def prepared_builder(data_dir: str) -> EasyVqa:
    """The builder over data_dir, building the dataset there first if it is not yet built."""
    _check_data_dir(data_dir)
    builder = EasyVqa(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        print(f"Building easy-VQA into {data_dir} (first use only, a few seconds).")
        builder.download_and_prepare(file_format="array_record")
    return builder


def _to_image_record(raw: dict) -> ImageRecord:
    return ImageRecord(
        image_id=int(raw["image_id"]),
        image=np.asarray(raw["image"], dtype=np.uint8),
        questions=tuple(q.decode() for q in raw["questions"]),
        answers=tuple(a.decode() for a in raw["answers"]),
    )


def load_image_records(data_dir: str, split: str) -> list[ImageRecord]:
    """The split's images with their questions, sorted by image_id (stored order is shuffled)."""
    if split not in SPLITS:
        raise ValueError(f"Expected split to be one of {SPLITS}, got {split!r}.")
    source = prepared_builder(data_dir).as_data_source()[split]
    records = [_to_image_record(source[i]) for i in range(len(source))]
    return sorted(records, key=lambda record: record.image_id)
