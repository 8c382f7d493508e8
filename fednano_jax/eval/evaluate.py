"""Evaluate adapters on every client's test set: greedy answers, official accuracy per client.

Answers are scored by the dataset's official rule (`eval.official_accuracy`); each result
holds the per-client accuracy, their average and, for ScienceQA and IconQA, the
breakdown the dataset's authors report, over all clients' test rows together.

Methods answer through `shared` (one adapter for every client) or `personal` (each client
its own); a method with its own way (FedDPA-F's per-instance mix) builds it from
`batches`, `answers` and `score`. With heterogeneous adapter ranks (`model.adapter.client_ranks`)
each client answers with the shared adapters truncated to its own rank, and results add the
average accuracy of each rank's clients (`rank_average`).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from fednano_jax.data.pipeline import FederatedData
from fednano_jax.data.datasets import dataset_name
from fednano_jax.data.prompts import DEFAULT_TEMPLATE, cut_at_end, template_of
from fednano_jax.eval.accuracy import per_client_accuracy
from fednano_jax.eval.generate import greedy_generate, linked_generate
from fednano_jax.eval.official_accuracy import SCORERS, breakdown
from fednano_jax.models.adapter_ranks import client_ranks, truncate


def decode_answers(tokenizer, tokens: np.ndarray, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Each row's text up to </s> and the template's end symbol (MiniGPT-4's `###`)."""
    eos = tokenizer.eos_token_id
    out = []
    for row in tokens.tolist():
        row = row[: row.index(eos)] if eos in row else row
        out.append(cut_at_end(tokenizer.decode(row, skip_special_tokens=True), template))
    return out


def _client(tree, k):
    return jax.tree.map(lambda x: x[k], tree)


class Evaluator:
    """Test accuracy per client. `linked`: `linked(client) -> next_tokens` decodes with the decoder across the split
    link (`generate.linked_generate`), each client's test rows as that client (NanoEdge alone here); None: the whole
    model here."""

    linked: Callable | None = None

    def __init__(self, graphdef, frozen, data: FederatedData, tokenizer, config, linked: Callable | None = None):
        self.graphdef, self.frozen, self.data, self.tokenizer = graphdef, frozen, data, tokenizer
        self.linked = linked
        self.batch_size = config.eval.batch_size
        self.decode = dict(max_new_tokens=config.eval.max_new_tokens, pad_id=tokenizer.pad_token_id,
                           eos_id=tokenizer.eos_token_id)
        self.seed = config.seed
        self.scorer = SCORERS[dataset_name(config)]
        self.ranks = client_ranks(config.model.adapter, len(data.client_test))
        self.template = template_of(config)

    def batches(self, rows: np.ndarray):
        """Fixed-size batches of test rows (the last padded by repeating row 0), so one compile serves all."""
        padded = np.concatenate([rows, np.full(-len(rows) % self.batch_size, rows[0] if len(rows) else 0)])
        test = self.data.test
        for start in range(0, len(padded), self.batch_size):
            batch = padded[start: start + self.batch_size]
            yield start, (test.input_ids[batch], test.attention_mask[batch], self.data.images[test.image_index[batch]])

    def answers(self, rows: np.ndarray, generate) -> list[str]:
        tokens = [np.asarray(generate(start, inputs)) for start, inputs in self.batches(rows)]
        return decode_answers(self.tokenizer, np.concatenate(tokens)[: len(rows)], self.template) if tokens else []

    def score(self, predictions: dict[int, str]) -> dict:
        rows = np.arange(len(self.data.test))
        meta = self.data.test_meta
        correct = self.scorer.correct([predictions[r] for r in rows], self.data.test_answers, meta)
        accuracy = per_client_accuracy(correct, self.data.client_test)
        result = {"accuracy": accuracy, "average": float(np.nanmean(accuracy))}
        if self.ranks is not None:
            result["rank_average"] = {str(r): float(np.nanmean(np.asarray(accuracy)[self.ranks == r]))
                                      for r in sorted(set(self.ranks.tolist()), reverse=True)}
        groups = self.scorer.groups(meta) if meta else {}
        return {**result, "breakdown": breakdown(correct, groups)} if groups else result

    def shared(self, adapters) -> dict:
        if self.linked is not None:  # each client's rows as that client, at its rank
            return self.score({row: answer for k, rows in enumerate(self.data.client_test)
                               for row, answer in zip(rows.tolist(), self._generate(rows, self._at_rank(adapters, k), k))})
        if self.ranks is not None:
            return self._shared_by_rank(adapters)
        rows = np.arange(len(self.data.test))
        return self.score(dict(zip(rows.tolist(), self._generate(rows, adapters))))

    def _at_rank(self, adapters, k: int):
        return adapters if self.ranks is None else truncate(adapters, int(self.ranks[k]))

    def _generate(self, rows: np.ndarray, adapters, client: int = 0) -> list[str]:
        if self.linked is not None:
            return self.answers(rows, lambda _, inputs: linked_generate(
                self.linked(client), self.graphdef, self.frozen, adapters, *inputs, **self.decode))
        return self.answers(rows, lambda _, inputs: greedy_generate(
            self.graphdef, self.frozen, adapters, *inputs, **self.decode))

    def _shared_by_rank(self, adapters) -> dict:
        """Each client's test rows answered by the shared adapters truncated to that client's rank."""
        predictions = {}
        for rank in sorted(set(self.ranks.tolist())):
            clients = np.flatnonzero(self.ranks == rank)
            rows = np.concatenate([self.data.client_test[k] for k in clients])
            predictions.update(zip(rows.tolist(), self._generate(rows, truncate(adapters, rank))))
        return self.score(predictions)

    def personal(self, stacked_adapters) -> dict:
        predictions = {}
        for k, rows in enumerate(self.data.client_test):
            predictions.update(zip(rows.tolist(), self._generate(rows, _client(stacked_adapters, k), k)))
        return self.score(predictions)
