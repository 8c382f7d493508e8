"""SCAFFOLD (Karimireddy et al., 2020): control variates correct each client's drift.

Server state: the global adapters x and the server control c. Client state: its control
c_i (zero at first). Every local step follows g(y) - c_i + c. After training, the client's
new control is the mean of the raw data gradients along its local steps: with SGD at
learning rate eta over K steps that is exactly the paper's option II,
c_i+ = c_i - c + (x - y_K) / (K eta), and unlike that formula it stays a gradient whatever
the client optimizer (`fed.optimizer`, Adam by default), so the correction has the
gradients' scale. The client uploads its adapters y_i and the change of its control
Delta c_i; the server sets x to their example-weighted mean (global step 1) and
c <- c + (1 / N) sum_{i in S} Delta c_i over the N clients, which keeps c the mean of the c_i.
A client that does not report keeps its old control, and its change is not counted.
"""

import jax
import jax.numpy as jnp

from fednano_jax.federated.aggregation import DELTA, apply_sums
from fednano_jax.federated.methods.base import Method


class Scaffold(Method):
    name, label = "scaffold", "SCAFFOLD"
    no_ranks = ("its server control variate is one full-rank tree added to every client's steps, so a client of "
                "a lower rank would be corrected along components it does not hold")
    uploads = ("adapters", "control_delta")
    downloads = ("adapters", "control")
    unweighted = ("control_delta",)  # c moves by the plain mean of the clients' control changes

    def client_state_init(self, adapters):
        return {"control": jax.tree.map(jnp.zeros_like, adapters)}

    def server_init(self, adapters):
        return {"adapters": adapters, "control": jax.tree.map(jnp.zeros_like, adapters)}

    def broadcast(self, server_state):
        return {"adapters": server_state["adapters"], "control": server_state["control"]}

    def local_gradient(self, grads, adapters, start, broadcast, client_state):
        return jax.tree.map(lambda g, c, ci: g + c - ci, grads, broadcast["control"], client_state["control"])

    def sums_init(self, start):
        return jax.tree.map(jnp.zeros_like, start)

    def accumulate(self, sums, grads):
        return jax.tree.map(jnp.add, sums, grads.mean)

    def client_final(self, result, broadcast, client_state):
        steps = jnp.maximum(result.steps, 1).astype(jnp.float32)
        control = jax.tree.map(lambda s: s / steps, result.sums)
        delta = jax.tree.map(jnp.subtract, control, client_state["control"])
        return {"adapters": result.adapters, "control_delta": delta}, {"control": control}

    def contribution(self, upload, broadcast, mask=None):
        return {**super().contribution(upload, broadcast, mask), "control_delta": upload["control_delta"]}

    def dp_bounds(self, clip_norm, adapters):
        return {DELTA: (clip_norm, 0.5), "control_delta": (clip_norm, 0.5)}

    def finalize(self, server_state, sums):
        share = 1.0 / self.fed.num_clients  # unusable clients' control changes are not in the sum
        control = jax.tree.map(lambda c, d: c + share * d, server_state["control"], sums["control_delta"])
        return {**server_state, "adapters": apply_sums(server_state["adapters"], sums), "control": control}
