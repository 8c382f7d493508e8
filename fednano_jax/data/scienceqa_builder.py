"""ScienceQA (Lu et al., 2022) as a tensorflow-datasets builder over a local copy (tfds manual dir).

Two sources, one builder config each, never downloading:

- "official": the authors' release (github.com/lupantech/ScienceQA): `problems.json`
  (pid -> question, choices, answer index, hint, image, task, grade, subject, topic,
  category, skill, lecture, solution, split), `pid_splits.json` (split -> pids) and
  `images/<split>/<pid>/image.png` for the problems whose `image` is set;
- "parquet": the Hugging Face mirror derek-thomas/ScienceQA, `<split>-*.parquet`
  files (anywhere under the root) with splits train / validation / test.

Images are stored as their encoded bytes (empty for a text-only problem) and decoded
at load time at the model's size; no TensorFlow is needed.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from fednano_jax.errors import DataError
from fednano_jax.data.problems import OFFICIAL_SPLITS, read_bytes, read_json, require_fields, require_mapping

HOME = "https://github.com/lupantech/ScienceQA"
OFFICIAL_LAYOUT = (f"expected data.root to hold ScienceQA as its authors publish it at {HOME} (problems.json, "
                   "pid_splits.json with train/val/test, images/<split>/<pid>/image.png).")
PARQUET_LAYOUT = ("expected data.root to hold the Hugging Face parquet mirror of ScienceQA (derek-thomas/ScienceQA: "
                  "train-*.parquet, validation-*.parquet, test-*.parquet) or, with data.format='official', "
                  f"the authors' release from {HOME}.")
TEXT_FIELDS = ("question", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
PARQUET_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> the mirror's


def official_release(root: str) -> tuple[dict, dict]:
    """(problems, pid_splits) of the authors' release, checked."""
    problems = require_mapping(read_json(os.path.join(root, "problems.json"), OFFICIAL_LAYOUT),
                               "problems.json", OFFICIAL_LAYOUT)
    path = os.path.join(root, "pid_splits.json")
    splits = require_mapping(read_json(path, OFFICIAL_LAYOUT), "pid_splits.json", OFFICIAL_LAYOUT)
    require_fields(splits, OFFICIAL_SPLITS, path, OFFICIAL_LAYOUT)
    for split in OFFICIAL_SPLITS:
        unknown = [pid for pid in splits[split] if pid not in problems]
        if unknown:
            raise DataError(f"pid_splits.json lists {split} pid {unknown[0]} that problems.json lacks; "
                            f"{OFFICIAL_LAYOUT}")
    return problems, splits


def _record(pid: str, problem: dict, image: bytes) -> dict:
    return {"pid": pid, **{field: str(problem.get(field) or "") for field in TEXT_FIELDS},
            "choices": [str(c) for c in problem["choices"]], "answer": int(problem["answer"]), "image": image}


def official_records(root: str, split: str) -> Iterator[dict]:
    problems, splits = official_release(root)
    for pid in splits[split]:
        problem = require_fields(problems[pid], ("question", "choices", "answer"), f"problems.json entry {pid}",
                                 OFFICIAL_LAYOUT)
        image = problem.get("image")
        png = read_bytes(os.path.join(root, "images", split, pid, image), OFFICIAL_LAYOUT) if image else b""
        yield _record(pid, problem, png)


def parquet_files(root: str, split: str) -> list[str]:
    pattern = os.path.join(root, "**", f"{PARQUET_SPLITS[split]}-*.parquet")
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise DataError(f"{root} has no {PARQUET_SPLITS[split]}-*.parquet file; {PARQUET_LAYOUT}")
    return files


def parquet_records(root: str, split: str) -> Iterator[dict]:
    import pyarrow.parquet as pq  # a tensorflow-datasets dependency

    count = 0
    for path in parquet_files(root, split):
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:  # noqa: BLE001 - any unreadable file is the user's data
            raise DataError(f"{path} is not a readable parquet file ({type(error).__name__}); {PARQUET_LAYOUT}")
        for row in rows:
            require_fields(row, ("question", "choices", "answer"), f"a row of {path}", PARQUET_LAYOUT)
            image = row.get("image") or {}
            yield _record(f"{split}-{count:06d}", row, image.get("bytes") or b"")
            count += 1


def check_release(root: str, data_format: str) -> None:
    """Stops with a DataError before any building if the release in `root` is not usable."""
    layout = OFFICIAL_LAYOUT if data_format == "official" else PARQUET_LAYOUT
    if not os.path.isdir(root):
        raise DataError(f"data.root {root!r} is not a directory; {layout}")
    if data_format == "official":
        official_release(root)
    else:
        for split in OFFICIAL_SPLITS:
            parquet_files(root, split)


class ScienceQa(tfds.core.GeneratorBasedBuilder):
    """ScienceQA from a local copy: one record per problem, image as encoded bytes (empty if none)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official release or parquet mirror, from a manual dir."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="official", description="The authors' release."),
                       tfds.core.BuilderConfig(name="parquet", description="derek-thomas/ScienceQA parquet.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = OFFICIAL_LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        text = {field: tfds.features.Text() for field in ("pid", *TEXT_FIELDS)}
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                **text,
                "choices": tfds.features.Sequence(tfds.features.Text()),
                "answer": tfds.features.Scalar(dtype=np.int64),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes; b"" if none
            }),
            homepage=HOME,
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        source = official_records if self.builder_config.name == "official" else parquet_records
        return {split: self._generate_examples(source, root, split) for split in OFFICIAL_SPLITS}

    def _generate_examples(self, source, root: str, split: str) -> Iterator[tuple[str, dict]]:
        for record in source(root, split):
            yield record["pid"], record
