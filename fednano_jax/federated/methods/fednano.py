"""FedNano: local epochs, then an extra pass over the local data for the diagonal Fisher; Fisher merge (Eq. 1)."""

import dataclasses
import math

import jax
import jax.numpy as jnp

from fednano_jax.federated.aggregation import (CORRECTIONS, DELTA, FISHER_FLOOR, WEIGHT, fisher_contribution,
                                               mean_contribution, update_of)
from fednano_jax.federated.fisher import add_squared_example_grads
from fednano_jax.federated.methods.base import Method
from fednano_jax.federated.objective import Wire
from fednano_jax.settings import require


@dataclasses.dataclass(frozen=True)
class FisherMergeHyperparameters:
    """FedNano-EF's: Eq. 1's floor and weights."""

    fisher_floor: float = FISHER_FLOOR  # floor on the diagonal Fisher
    fisher_example_weights: bool = True  # weight each client's Fisher by its examples |D_k| (Eq. 1); False: ablation

    def __post_init__(self):
        require(self.fisher_floor > 0, f"fed.fisher_floor must be positive, got {self.fisher_floor}.")


@dataclasses.dataclass(frozen=True)
class FisherHyperparameters(FisherMergeHyperparameters):
    """FedNano's: also the Fisher pass's examples."""

    fisher_examples: int = 0  # examples of its first epoch the Fisher pass uses (0 = all)

    def __post_init__(self):
        super().__post_init__()
        require(self.fisher_examples >= 0,
                f"fed.fisher_examples must be 0 (every example) or a positive cap, got {self.fisher_examples}.")


class FedNano(Method):
    name, label = "fednano", "FedNano"
    uploads = ("adapters", "fisher")
    extra_passes = 1
    Hyperparameters = FisherHyperparameters

    @property
    def extra_pass_examples(self) -> int:
        return self.hyperparameters.fisher_examples

    def extra_pass_init(self, adapters):
        return {"squares": jax.tree.map(jnp.zeros_like, adapters), "examples": jnp.zeros((), jnp.float32)}

    def extra_pass_step(self, total, shared, adapters, rows, valid):
        squares = add_squared_example_grads(shared.graphdef, adapters, shared.frozen, shared.data, total["squares"],
                                            rows, valid, Wire.of(self.fed, rows, self.seed, self.remote))
        return {"squares": squares, "examples": total["examples"] + valid.sum()}

    def client_final(self, result, broadcast, client_state):
        count = jnp.maximum(result.extra["examples"], 1.0)
        fisher = jax.tree.map(lambda s: s / count, result.extra["squares"])
        return {"adapters": result.adapters, "fisher": fisher}, client_state

    def client_weight(self, num_examples):
        if not self.hyperparameters.fisher_example_weights:  # the ablation: Fisher alone, no |D_k| weights
            return (jnp.asarray(num_examples) > 0).astype(jnp.float32)
        return num_examples

    def contribution(self, upload, broadcast, mask=None):
        """Eq. 1's terms: F̃ ⊙ Δ and F̃, the Fisher floored (`aggregation.fisher_contribution`)."""
        return fisher_contribution(update_of(upload["adapters"], broadcast["adapters"]), upload["fisher"],
                                   self.hyperparameters.fisher_floor, mask)

    def private_contribution(self, upload, broadcast, mask=None):
        """Eq. 1's terms under DP (`privacy/dp.py`): each leaf of the floored Fisher rescaled to mean one over the
        entries the client holds, F̂ = 1 + G (its scale, a client's unbounded claim of importance, is gone), and
        the two sums split as FedAvg's plus corrections: Σ w F̂ Δ = Σ w Δ + Σ w G Δ, Σ w F̂ = Σ w + Σ w G."""
        delta = update_of(upload["adapters"], broadcast["adapters"])
        plain = mean_contribution(delta, mask)
        importance = fisher_contribution(delta, upload["fisher"], self.hyperparameters.fisher_floor, mask)[WEIGHT]

        def excess(f, held):  # G = F̂ - 1 on the entries held, 0 elsewhere
            mean = jnp.sum(f) / jnp.maximum(jnp.sum(held), 1.0)
            return (f / jnp.maximum(mean, 1e-30) - 1.0) * held

        held = jax.tree.map(lambda f: (f > 0).astype(jnp.float32), importance)
        g = jax.tree.map(excess, importance, held)
        return {**plain, CORRECTIONS[DELTA]: jax.tree.map(jnp.multiply, g, plain[DELTA]), CORRECTIONS[WEIGHT]: g}

    def dp_bounds(self, clip_norm, adapters):
        """Δ and G ⊙ Δ clipped to C; G to √(M d), F̂'s mean square at most M; the corrections share
        `fed.dp.fisher_noise_share` of the noise budget."""
        dp = self.fed.dp
        entries = sum(x.size for x in jax.tree.leaves(adapters))
        share = dp.fisher_noise_share
        return {DELTA: (clip_norm, 1.0 - share), CORRECTIONS[DELTA]: (clip_norm, share / 2),
                CORRECTIONS[WEIGHT]: (math.sqrt(dp.fisher_mean_square * entries), share / 2)}
