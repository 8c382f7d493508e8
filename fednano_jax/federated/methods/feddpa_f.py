"""FedDPA-F (Yang et al., 2024): a global adapter (FedAvg) plus a local one, mixed per test instance.

After federated training each client fine-tunes a local adapter starting from the
global one. At inference the test input and N of the client's training inputs are
embedded (final hidden state of the last prompt token, local adapter active, as the
authors' code does) and the mean cosine similarity, clipped to [0, 1] and scaled by
`max_weight` (0.5 by default), is the weight w of the *local* adapter; the global
adapter gets 1 - w. The local adapter receives w because w measures how much the
input resembles the client's own data: the more it does, the more the personalised
adapter is trusted, while the global one keeps at least half the say (w <= 0.5),
which is what protects FedDPA under test-time distribution shift.

Both adapters are NanoAdapters, so the mixture `(1 - w) up_g(down_g x) + w up_l(down_l x)`
is itself one adapter of twice the rank: down = [down_g, down_l], up = [(1 - w) up_g; w up_l].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.eval.generate import greedy_generate
from fednano_jax.federated.methods.base import Method
from fednano_jax.models.mllm import merge_model
from fednano_jax.settings import require
from fednano_jax.streams import Purpose, generator


def mix_adapters(global_adapters, local_adapters, local_weight):
    """The rank-2r adapter state equal to (1 - w) * global + w * local on every input."""

    def mix(path, g, l):
        name = [entry.key for entry in path if hasattr(entry, "key")][-1]
        if name == "down":
            return jnp.concatenate([g, l], axis=-1)
        return jnp.concatenate([(1.0 - local_weight) * g, local_weight * l], axis=-2)

    return jax.tree_util.tree_map_with_path(mix, global_adapters, local_adapters)


def instance_weights(test_features: jax.Array, reference_features: jax.Array, max_weight: float) -> jax.Array:
    """[num_test] local-adapter weights in [0, max_weight] from mean cosine similarity to the references."""
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    similarity = (unit(test_features) @ unit(reference_features).T).mean(axis=-1)
    return max_weight * jnp.clip(similarity, 0.0, 1.0)


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


def reference_rows(seed: int, client_id: int, train_rows: np.ndarray, count: int) -> np.ndarray:
    """The client's training inputs its test inputs are compared with (`fed.dpa_instances` of them)."""
    rng = generator(seed, Purpose.DPA_REFERENCES, 0, client_id)
    return np.sort(rng.choice(train_rows, size=min(count, len(train_rows)), replace=False))


def local_weights(evaluator, local_adapters, rows: np.ndarray, references: np.ndarray, max_weight: float):
    """[len(rows)] the local adapter's weight for each test row."""
    train, test, images = evaluator.data.train, evaluator.data.test, evaluator.data.images
    last = np.argmax(train.loss_mask[references], axis=1) - 1
    ref = prompt_features(evaluator.graphdef, evaluator.frozen, local_adapters, train.input_ids[references],
                          train.attention_mask[references], images[train.image_index[references]], last)
    last_prompt = np.full(evaluator.batch_size, test.input_ids.shape[1] - 1)  # prompts are left-padded
    features = [prompt_features(evaluator.graphdef, evaluator.frozen, local_adapters, *inputs, last_prompt)
                for _, inputs in evaluator.batches(rows)]
    return instance_weights(jnp.concatenate(features)[: len(rows)], ref, max_weight)


@dataclasses.dataclass(frozen=True)
class DpaHyperparameters:
    dpa_local_epochs: int = 1  # local fine-tuning of the local adapter after the rounds
    dpa_instances: int = 5  # local training inputs compared with each test input
    dpa_max_weight: float = 0.5  # the largest weight the local adapter can get

    def __post_init__(self):
        require(self.dpa_local_epochs >= 1, f"fed.dpa_local_epochs must be at least 1, got {self.dpa_local_epochs}.")
        require(self.dpa_instances >= 1, f"fed.dpa_instances must be at least 1, got {self.dpa_instances}.")
        require(0.0 <= self.dpa_max_weight <= 1.0,
                f"fed.dpa_max_weight must lie in [0, 1], got {self.dpa_max_weight}.")


class FedDPAF(Method):
    """FedAvg rounds; then each client fine-tunes a local adapter from the global one
    (`fed.dpa_local_epochs`); at test time each input mixes the two (`fed.dpa_instances`, `fed.dpa_max_weight`)."""

    name, label = "feddpa_f", "FedDPA-F"
    Hyperparameters = DpaHyperparameters
    no_ranks = ("each test input mixes the global and the local adapter into one adapter of twice the rank, "
                "whose halves a client of a lower rank does not both hold")

    def client_state_init(self, adapters):
        return adapters  # the local adapter, trained after the last round

    local_phase = True

    def evaluation_programs(self, graphdef, frozen, adapters, prompts, last_prompt_index, local_weights, decode):
        """Prompt features with the local adapter, then per-row mixed decoding."""
        return {f"{self.name}_features": lambda: prompt_features.lower(graphdef, frozen, adapters, *prompts,
                                                                       last_prompt_index),
                f"{self.name}_generate": lambda: mixed_generate.lower(graphdef, frozen, adapters, adapters,
                                                                      local_weights, *prompts, **decode)}

    def after_rounds(self, server_state, client_states, local_trainer):
        return local_trainer(server_state["adapters"], self.hyperparameters.dpa_local_epochs)

    def evaluate(self, evaluator, server_state, client_states, last):
        if not last:
            return evaluator.shared(server_state["adapters"])
        global_adapters, predictions, mean_weights = server_state["adapters"], {}, []
        for k, rows in enumerate(evaluator.data.client_test):
            if not len(rows):
                continue
            local = jax.tree.map(lambda x: x[k], client_states)
            references = reference_rows(evaluator.seed, k, evaluator.data.client_train[k], self.hyperparameters.dpa_instances)
            weights = local_weights(evaluator, local, rows, references, self.hyperparameters.dpa_max_weight)
            padded = jnp.concatenate([weights, jnp.zeros(-len(rows) % evaluator.batch_size)])
            answers = evaluator.answers(rows, lambda start, inputs: mixed_generate(
                evaluator.graphdef, evaluator.frozen, global_adapters, local,
                padded[start: start + evaluator.batch_size], *inputs, **evaluator.decode))
            predictions.update(zip(rows.tolist(), answers))
            mean_weights.append(float(weights.mean()))
        return {**evaluator.score(predictions), "dpa_local_weight": mean_weights}
