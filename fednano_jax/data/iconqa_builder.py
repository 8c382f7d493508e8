"""IconQA (Lu et al., 2021) as a tensorflow-datasets builder over the authors' release (tfds manual dir).

The release (github.com/lupantech/IconQA): `problems.json` (pid -> question, choices,
answer, ...), `pid_splits.json` (keys `<sub-task>_<split>`, e.g. `choose_txt_train`),
`pid2skills.json` (pid -> list of skills) and
`iconqa/<split>/<choose_img|choose_txt|fill_in_blank>/<pid>/` holding `image.png`,
`data.json` and, for choose_img, `choice_<k>.png` per choice. Text comes from
problems.json; images are stored as encoded bytes and decoded at load time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from fednano_jax.errors import DataError
from fednano_jax.data.problems import OFFICIAL_SPLITS, read_bytes, read_json, require_fields, require_mapping

HOME = "https://github.com/lupantech/IconQA"
LAYOUT = (f"expected data.root to hold IconQA as its authors publish it at {HOME} (problems.json, pid_splits.json "
          "with keys such as choose_txt_train, pid2skills.json, and iconqa/<split>/<choose_img|choose_txt|"
          "fill_in_blank>/<pid>/image.png with choice_<k>.png for choose_img).")
SUBTASKS = ("choose_img", "choose_txt", "fill_in_blank")


def release(root: str) -> tuple[dict, dict, dict]:
    """(problems, pid_splits, pid2skills) of the authors' release, checked."""
    problems, splits, skills = (
        require_mapping(read_json(os.path.join(root, name), LAYOUT), name, LAYOUT)
        for name in ("problems.json", "pid_splits.json", "pid2skills.json"))
    for split in OFFICIAL_SPLITS:
        if not any(f"{subtask}_{split}" in splits for subtask in SUBTASKS):
            raise DataError(f"pid_splits.json has no {split} key (such as choose_txt_{split}); {LAYOUT}")
    for subtask, split, pid in split_pids(splits):
        if pid not in problems or not skills.get(pid):
            lacking = "problems.json" if pid not in problems else "pid2skills.json"
            raise DataError(f"{lacking} lacks pid {pid} that pid_splits.json lists under {subtask}_{split}; {LAYOUT}")
    return problems, splits, skills


def split_pids(splits: dict, only_split: str | None = None) -> Iterator[tuple[str, str, str]]:
    for split in OFFICIAL_SPLITS if only_split is None else (only_split,):
        for subtask in SUBTASKS:
            for pid in splits.get(f"{subtask}_{split}", []):
                yield subtask, split, str(pid)


def _record(root: str, subtask: str, split: str, pid: str, problem: dict, skills: list) -> dict:
    require_fields(problem, ("question", "answer"), f"problems.json entry {pid}", LAYOUT)
    folder = os.path.join(root, "iconqa", split, subtask, pid)
    choices = [str(c) for c in problem.get("choices") or []]
    if subtask != "fill_in_blank" and not choices:
        raise DataError(f"problems.json entry {pid} ({subtask}) has no choices; {LAYOUT}")
    choice_images = ([read_bytes(os.path.join(folder, f"choice_{k}.png"), LAYOUT) for k in range(len(choices))]
                     if subtask == "choose_img" else [])
    return {"pid": pid, "question": str(problem["question"]), "choices": choices, "answer": str(problem["answer"]),
            "subtask": subtask, "skills": [str(s) for s in skills],
            "image": read_bytes(os.path.join(folder, "image.png"), LAYOUT), "choice_images": choice_images}


def records(root: str, split: str) -> Iterator[dict]:
    problems, splits, skills = release(root)
    for subtask, _, pid in split_pids(splits, split):
        yield _record(root, subtask, split, pid, problems[pid], skills[pid])


def check_release(root: str) -> None:
    """Stops with a DataError before any building if the release in `root` is not usable."""
    if not os.path.isdir(root):
        raise DataError(f"data.root {root!r} is not a directory; {LAYOUT}")
    release(root)


class IconQa(tfds.core.GeneratorBasedBuilder):
    """IconQA from the authors' release: one record per problem, images as encoded bytes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official release from a manual dir."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="official", description="The authors' release.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        encoded = tfds.features.Tensor(shape=(), dtype=np.object_)
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                **{field: tfds.features.Text() for field in ("pid", "question", "answer", "subtask")},
                "choices": tfds.features.Sequence(tfds.features.Text()),  # choose_img: the file names
                "skills": tfds.features.Sequence(tfds.features.Text()),
                "image": encoded,
                "choice_images": tfds.features.Sequence(encoded),  # choose_img only
            }),
            homepage=HOME,
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(root, split) for split in OFFICIAL_SPLITS}

    def _generate_examples(self, root: str, split: str) -> Iterator[tuple[str, dict]]:
        for record in records(root, split):
            yield record["pid"], record
