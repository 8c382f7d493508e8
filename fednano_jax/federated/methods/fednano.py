"""FedNano: local epochs, then an extra pass over the local data for the diagonal Fisher; Fisher merge (Eq. 1)."""

from fednano_jax.federated.aggregation import fisher_merge
from fednano_jax.federated.fisher import diagonal_fisher
from fednano_jax.federated.methods.base import Method


class FedNano(Method):
    name, label = "fednano", "FedNano"
    uploads = ("adapters", "fisher")
    extra_passes = 1

    def client_final(self, result, context, broadcast, client_state):
        fisher = diagonal_fisher(context.graphdef, result.adapters, context.frozen, context.data,
                                 context.epoch_rows, context.epoch_valid)
        return {"adapters": result.adapters, "fisher": fisher}, client_state

    def server_update(self, server_state, uploads, weights):
        merged = fisher_merge(uploads["adapters"], uploads["fisher"], weights, self.fed.fisher_floor)
        return {**server_state, "adapters": merged}
