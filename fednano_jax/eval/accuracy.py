"""Exact-match accuracy, per client and on average."""

from __future__ import annotations

import numpy as np


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def exact_match(predictions: list[str], answers: list[str]) -> np.ndarray:
    return np.array([normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)])


def per_client_accuracy(correct: np.ndarray, client_rows: list[np.ndarray]) -> list[float]:
    """Accuracy of each client on its own test rows (nan for a client without test rows)."""
    return [float(correct[rows].mean()) if len(rows) else float("nan") for rows in client_rows]
