"""Evaluate adapters on every client's test set: greedy answers, official accuracy per client.

Answers are scored by the dataset's official rule (`eval.official_accuracy`); each result
holds the per-client accuracy, their average and, for ScienceQA and IconQA, the
breakdown the dataset's authors report, over all clients' test rows together.

Three ways a method may answer: one shared (global) adapter for every client, each
client with its own adapters (LocFT), or FedDPA-F's per-instance mix of a global and
a local adapter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.data.pipeline import FederatedData
from fednano_jax.data.datasets import dataset_name
from fednano_jax.eval.accuracy import per_client_accuracy
from fednano_jax.eval.generate import greedy_generate
from fednano_jax.eval.official_accuracy import SCORERS, breakdown
from fednano_jax.federated.feddpa import instance_weights, mix_adapters
from fednano_jax.models.mllm import merge_model


def decode_answers(tokenizer, tokens: np.ndarray) -> list[str]:
    eos = tokenizer.eos_token_id
    out = []
    for row in tokens.tolist():
        row = row[: row.index(eos)] if eos in row else row
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prompt_features(graphdef, frozen, adapters, input_ids, attention_mask, images, last_prompt_index):
    """Final hidden state at each row's last prompt token [B, D]."""
    model = merge_model(graphdef, frozen, adapters)
    hidden = model.server.hidden_states(model.edge(input_ids, images), attention_mask)
    return hidden[jnp.arange(hidden.shape[0]), last_prompt_index]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "pad_id", "eos_id"))
def mixed_generate(graphdef, frozen, global_adapters, local_adapters, weights, input_ids, attention_mask, images,
                   *, max_new_tokens, pad_id, eos_id):
    """Greedy answers, each row with its own mix of the global and local adapters."""

    def one(weight, ids, mask, image):
        adapters = mix_adapters(global_adapters, local_adapters, weight)
        return greedy_generate(graphdef, frozen, adapters, ids[None], mask[None], image[None],
                               max_new_tokens=max_new_tokens, pad_id=pad_id, eos_id=eos_id)[0]

    return jax.vmap(one)(weights, input_ids, attention_mask, images)


def _client(tree, k):
    return jax.tree.map(lambda x: x[k], tree)


class Evaluator:
    def __init__(self, graphdef, frozen, data: FederatedData, tokenizer, config):
        self.graphdef, self.frozen, self.data, self.tokenizer = graphdef, frozen, data, tokenizer
        self.batch_size = config.eval.batch_size
        self.decode = dict(max_new_tokens=config.eval.max_new_tokens, pad_id=tokenizer.pad_token_id,
                           eos_id=tokenizer.eos_token_id)
        self.dpa_instances, self.dpa_max_weight = config.fed.dpa_instances, config.fed.dpa_max_weight
        self.seed = config.seed
        self.scorer = SCORERS[dataset_name(config)]

    def _batches(self, rows: np.ndarray):
        """Fixed-size batches of test rows (the last padded by repeating row 0), so one compile serves all."""
        padded = np.concatenate([rows, np.full(-len(rows) % self.batch_size, rows[0] if len(rows) else 0)])
        test = self.data.test
        for start in range(0, len(padded), self.batch_size):
            batch = padded[start: start + self.batch_size]
            yield start, (test.input_ids[batch], test.attention_mask[batch], self.data.images[test.image_index[batch]])

    def _answers(self, rows: np.ndarray, generate) -> list[str]:
        tokens = [np.asarray(generate(start, inputs)) for start, inputs in self._batches(rows)]
        return decode_answers(self.tokenizer, np.concatenate(tokens)[: len(rows)]) if tokens else []

    def _score(self, predictions: dict[int, str]) -> dict:
        rows = np.arange(len(self.data.test))
        meta = self.data.test_meta
        correct = self.scorer.correct([predictions[r] for r in rows], self.data.test_answers, meta)
        accuracy = per_client_accuracy(correct, self.data.client_test)
        result = {"accuracy": accuracy, "average": float(np.nanmean(accuracy))}
        groups = self.scorer.groups(meta) if meta else {}
        return {**result, "breakdown": breakdown(correct, groups)} if groups else result

    def shared(self, adapters) -> dict:
        rows = np.arange(len(self.data.test))
        answers = self._answers(rows, lambda _, inputs: greedy_generate(
            self.graphdef, self.frozen, adapters, *inputs, **self.decode))
        return self._score(dict(zip(rows.tolist(), answers)))

    def personal(self, stacked_adapters) -> dict:
        predictions = {}
        for k, rows in enumerate(self.data.client_test):
            adapters = _client(stacked_adapters, k)
            answers = self._answers(rows, lambda _, inputs: greedy_generate(
                self.graphdef, self.frozen, adapters, *inputs, **self.decode))
            predictions.update(zip(rows.tolist(), answers))
        return self._score(predictions)

    def dpa_weights(self, local_adapters, rows: np.ndarray, references: np.ndarray) -> jax.Array:
        train, test = self.data.train, self.data.test
        last = np.argmax(train.loss_mask[references], axis=1) - 1
        ref = prompt_features(self.graphdef, self.frozen, local_adapters, train.input_ids[references],
                              train.attention_mask[references], self.data.images[train.image_index[references]], last)
        last_prompt = np.full(self.batch_size, test.input_ids.shape[1] - 1)  # prompts are left-padded
        features = [prompt_features(self.graphdef, self.frozen, local_adapters, *inputs, last_prompt)
                    for _, inputs in self._batches(rows)]
        return instance_weights(jnp.concatenate(features)[: len(rows)], ref, self.dpa_max_weight)

    def dpa(self, global_adapters, stacked_local, client_train: list[np.ndarray]) -> dict:
        predictions, mean_weights = {}, []
        for k, rows in enumerate(self.data.client_test):
            if not len(rows):
                continue
            local = _client(stacked_local, k)
            rng = np.random.default_rng([self.seed, k, 0xD9A])
            count = min(self.dpa_instances, len(client_train[k]))
            references = np.sort(rng.choice(client_train[k], size=count, replace=False))
            weights = self.dpa_weights(local, rows, references)
            padded = jnp.concatenate([weights, jnp.zeros(-len(rows) % self.batch_size)])
            answers = self._answers(rows, lambda start, inputs: mixed_generate(
                self.graphdef, self.frozen, global_adapters, local, padded[start: start + self.batch_size],
                *inputs, **self.decode))
            predictions.update(zip(rows.tolist(), answers))
            mean_weights.append(float(weights.mean()))
        return {**self._score(predictions), "dpa_local_weight": mean_weights}
