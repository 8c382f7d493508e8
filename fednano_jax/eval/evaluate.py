"""Evaluate adapters on every client's test set: greedy answers, exact match per client."""

from __future__ import annotations

import numpy as np

from fednano_jax.data.pipeline import FederatedData
from fednano_jax.eval.accuracy import exact_match, per_client_accuracy
from fednano_jax.eval.generate import greedy_generate


def decode_answers(tokenizer, tokens: np.ndarray) -> list[str]:
    eos = tokenizer.eos_token_id
    out = []
    for row in tokens.tolist():
        row = row[: row.index(eos)] if eos in row else row
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def make_evaluator(graphdef, frozen, data: FederatedData, tokenizer, batch_size: int, max_new_tokens: int):
    """-> evaluate(adapters) -> {"accuracy": [per client], "average": mean over clients}."""
    test = data.test
    count = len(test)
    padded = -(-count // batch_size) * batch_size
    take = np.concatenate([np.arange(count), np.zeros(padded - count, int)])

    def predict(adapters) -> list[str]:
        tokens = []
        for start in range(0, padded, batch_size):
            rows = take[start: start + batch_size]
            tokens.append(np.asarray(greedy_generate(
                graphdef, frozen, adapters, test.input_ids[rows], test.attention_mask[rows],
                data.images[test.image_index[rows]], max_new_tokens=max_new_tokens,
                pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)))
        return decode_answers(tokenizer, np.concatenate(tokens)[:count])

    def evaluate(adapters) -> dict:
        correct = exact_match(predict(adapters), data.test_answers)
        accuracy = per_client_accuracy(correct, data.client_test)
        return {"accuracy": accuracy, "average": float(np.nanmean(accuracy))}

    return evaluate
