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

from fednano_jax.federated.aggregation import fedavg
from fednano_jax.federated.methods.base import Method


class Scaffold(Method):
    name, label = "scaffold", "SCAFFOLD"
    client_ranks = False  # no heterogeneous ranks: its control variates are not rank-masked
    uploads = ("adapters", "control_delta")
    downloads = ("adapters", "control")

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

    def server_update(self, server_state, uploads, weights, masks=None):
        adapters = fedavg(uploads["adapters"], weights)
        share = 1.0 / self.fed.num_clients
        control = jax.tree.map(lambda c, d: c + share * d.sum(axis=0), server_state["control"],
                               uploads["control_delta"])  # unusable clients' deltas are zeroed upstream
        return {"adapters": adapters, "control": control}
