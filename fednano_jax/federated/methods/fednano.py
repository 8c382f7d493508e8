"""FedNano: local epochs, then an extra pass over the local data for the diagonal Fisher; Fisher merge (Eq. 1)."""

import jax
import jax.numpy as jnp

from fednano_jax.federated.aggregation import fisher_merge
from fednano_jax.federated.fisher import add_squared_example_grads
from fednano_jax.federated.methods.base import Method
from fednano_jax.federated.objective import Wire


class FedNano(Method):
    name, label = "fednano", "FedNano"
    uploads = ("adapters", "fisher")
    extra_passes = 1
    dp_aggregate = "fisher"  # under fed.dp both sums of Eq. 1 are clipped and noised (privacy/dp.py)

    def extra_pass_init(self, adapters):
        return {"squares": jax.tree.map(jnp.zeros_like, adapters), "examples": jnp.zeros((), jnp.float32)}

    def extra_pass_step(self, total, model, adapters, rows, valid):
        squares = add_squared_example_grads(model.graphdef, adapters, model.frozen, model.data, total["squares"],
                                            rows, valid, Wire.of(self.fed, rows))
        return {"squares": squares, "examples": total["examples"] + valid.sum()}

    def client_final(self, result, broadcast, client_state):
        count = jnp.maximum(result.extra["examples"], 1.0)
        fisher = jax.tree.map(lambda s: s / count, result.extra["squares"])
        return {"adapters": result.adapters, "fisher": fisher}, client_state

    def server_update(self, server_state, uploads, weights, masks=None):
        if not self.fed.get("fisher_example_weights", True):  # the ablation: Fisher alone, no |D_k| weights
            weights = (weights > 0).astype(weights.dtype)
        merged = fisher_merge(uploads["adapters"], uploads["fisher"], weights, self.fed.fisher_floor, masks,
                              server_state["adapters"] if masks is not None else None)
        return {**server_state, "adapters": merged}
