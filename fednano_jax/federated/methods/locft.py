"""LocFT: each client trains its own adapters alone, round after round, and sends nothing."""

from fednano_jax.federated.methods.base import Method


class LocFT(Method):
    name, label = "locft", "LocFT"
    uploads = downloads = ()
    no_sums = "LocFT's clients send nothing, so there is no sum to protect"

    def client_state_init(self, adapters):
        return adapters  # the client's own adapters

    def local_start(self, broadcast, client_state):
        return client_state

    def client_final(self, result, broadcast, client_state):
        return {}, result.adapters

    def contribution(self, upload, broadcast, mask=None):
        return {}

    def finalize(self, server_state, sums):
        return server_state

    def evaluate(self, evaluator, server_state, client_states, last):
        return evaluator.personal(client_states)
