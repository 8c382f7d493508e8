"""FedNano-EF: the diagonal Fisher accumulated during training (no extra pass), on the extra pass's scale.

The extra pass (`fisher.diagonal_fisher`) averages, over examples, the squared gradient
of one example's summed answer NLL. A step's gradient of the batch's summed NLL is the
sum of its examples' gradients; near a minimum their cross terms average out, so its
square estimates the sum of the examples' squared gradients. Summing those squares
over the steps and dividing by the examples seen gives the same per-example mean,
whatever the batch size, the number of steps or the local epochs. (Summing squared
gradients of the token-mean loss instead grows with the steps and shrinks with the
batch, so Eq. 1 would weigh clients by about |D_k|^2 and the fixed `fisher_floor`
would mean different things on different clients.)
"""

import jax
import jax.numpy as jnp

from fednano_jax.federated.methods.fednano import FedNano, FisherMergeHyperparameters


class FedNanoEF(FedNano):
    name, label = "fednano_ef", "FedNano-EF"
    extra_passes = 0
    extra_pass_examples = 0
    Hyperparameters = FisherMergeHyperparameters

    def extra_pass_init(self, adapters):
        return None

    def sums_init(self, start):
        return {"squares": jax.tree.map(jnp.zeros_like, start), "examples": jnp.zeros((), jnp.float32)}

    def accumulate(self, sums, grads):
        squares = jax.tree.map(lambda total, g: total + jnp.square(g), sums["squares"], grads.summed)
        return {"squares": squares, "examples": sums["examples"] + grads.examples}

    def client_final(self, result, broadcast, client_state):
        count = jnp.maximum(result.sums["examples"], 1.0)
        fisher = jax.tree.map(lambda s: s / count, result.sums["squares"])
        return {"adapters": result.adapters, "fisher": fisher}, client_state
