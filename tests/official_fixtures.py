"""Tiny copies of ScienceQA and IconQA in their authors' exact layouts (and ScienceQA's HF parquet mirror).

Images are small non-square PNGs of one colour each (so LLaVA's square padding shows).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

SCIENCEQA_TOPICS = ("biology", "physics", "geography", "punctuation")
SCIENCEQA_SUBJECTS = {"biology": "natural science", "physics": "natural science", "geography": "social science",
                      "punctuation": "language science"}
SPLIT_SIZES = {"train": 40, "val": 8, "test": 16}


def png_bytes(colour: tuple[int, int, int], size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)


def _write_json(path: str, value) -> None:
    _write(path, json.dumps(value).encode())


def scienceqa_problem(index: int, split: str) -> dict:
    """Every other problem has an image, every third a hint; 2 to 5 choices; grades 1 to 12."""
    topic = SCIENCEQA_TOPICS[index % len(SCIENCEQA_TOPICS)]
    num_choices = 2 + index % 4
    choices = [f"thing {index} {c}" for c in range(num_choices)]
    return {"question": f"Which thing {index} is {topic}?", "choices": choices,
            "answer": index % num_choices, "hint": f"Hint about {topic}." if index % 3 == 0 else "",
            "image": "image.png" if index % 2 == 0 else None, "task": "closed choice",
            "grade": f"grade{1 + index % 12}", "subject": SCIENCEQA_SUBJECTS[topic], "topic": topic,
            "category": f"{topic} category", "skill": f"{topic} skill", "lecture": f"A lecture on {topic}.",
            "solution": f"The solution of {index}.", "split": split}


def scienceqa_problems(sizes=SPLIT_SIZES) -> dict[str, dict[str, dict]]:
    """split -> pid -> problem, pids numbered across splits as the release does."""
    out, pid = {}, 1
    for split, count in sizes.items():
        out[split] = {}
        for _ in range(count):
            out[split][str(pid)] = scienceqa_problem(pid, split)
            pid += 1
    return out


def write_scienceqa(root: str, sizes=SPLIT_SIZES) -> dict[str, dict[str, dict]]:
    by_split = scienceqa_problems(sizes)
    problems = {pid: p for split in by_split.values() for pid, p in split.items()}
    _write_json(os.path.join(root, "problems.json"), problems)
    _write_json(os.path.join(root, "pid_splits.json"), {split: list(p) for split, p in by_split.items()})
    for split, split_problems in by_split.items():
        for pid, problem in split_problems.items():
            if problem["image"]:
                _write(os.path.join(root, "images", split, pid, "image.png"), png_bytes((int(pid) * 7 % 256, 0, 0)))
    return by_split


def write_scienceqa_parquet(root: str, sizes=SPLIT_SIZES) -> dict[str, dict[str, dict]]:
    """The HF mirror: data/<split>-00000-of-00001.parquet, image a {bytes, path} struct or null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_split = scienceqa_problems(sizes)
    names = {"train": "train", "val": "validation", "test": "test"}
    for split, split_problems in by_split.items():
        rows = []
        for pid, p in split_problems.items():
            image = {"bytes": png_bytes((int(pid) * 7 % 256, 0, 0)), "path": None} if p["image"] else None
            rows.append({**{k: v for k, v in p.items() if k != "split"}, "image": image})
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "data", f"{names[split]}-00000-of-00001.parquet"))
    return by_split


ICONQA_SKILLS = ("counting", "comparing", "spatial", "pattern")
ICONQA_SUBTASKS = ("choose_img", "choose_txt", "fill_in_blank")
MULTI_SKILL_PID = "1"  # skills ["spatial", "counting"]: partitioned as spatial, scored under both


def iconqa_problem(index: int, subtask: str, split: str) -> dict:
    if subtask == "fill_in_blank":
        choices, answer = [], str(index % 9)
    elif subtask == "choose_txt":
        choices, answer = [f"word{index}", f"word{index + 1}", f"word{index + 2}"], index % 3
    else:
        choices, answer = [f"choice_{k}.png" for k in range(2 + index % 2)], index % 2
    return {"question": f"How many things {index}?", "choices": choices, "answer": answer, "ques_type": subtask,
            "grade": "prek", "label": "", "split": split}


def write_iconqa(root: str, sizes=SPLIT_SIZES) -> dict[str, list[tuple[str, str]]]:
    """-> split -> [(subtask, pid)]; the sub-tasks take turns, so every split has all three."""
    problems, pid_splits, skills, listing, pid = {}, {}, {}, {}, 1
    for split, count in sizes.items():
        listing[split] = []
        for i in range(count):
            subtask, key = ICONQA_SUBTASKS[i % 3], str(pid)
            problems[key] = iconqa_problem(pid, subtask, split)
            pid_splits.setdefault(f"{subtask}_{split}", []).append(key)
            skills[key] = ["spatial", "counting"] if key == MULTI_SKILL_PID else [ICONQA_SKILLS[pid % 4]]
            folder = os.path.join(root, "iconqa", split, subtask, key)
            _write(os.path.join(folder, "image.png"), png_bytes((0, pid * 11 % 256, 0), (30, 20)))
            _write_json(os.path.join(folder, "data.json"), problems[key])
            for k in range(len(problems[key]["choices"]) if subtask == "choose_img" else 0):
                _write(os.path.join(folder, f"choice_{k}.png"), png_bytes((0, 0, 60 * (k + 1)), (12, 12)))
            listing[split].append((subtask, key))
            pid += 1
    _write_json(os.path.join(root, "problems.json"), problems)
    _write_json(os.path.join(root, "pid_splits.json"), pid_splits)
    _write_json(os.path.join(root, "pid2skills.json"), skills)
    return listing


def mean_colour_rgb(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3).mean(axis=0)
