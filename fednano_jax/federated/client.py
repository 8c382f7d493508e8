"""Local client updates for any method: `lax.scan` over steps, `vmap` over the leading clients axis.

A client's data arrive as row indices `[steps, batch]` into a dataset shared by all
clients (broadcast, never copied per client) plus a validity mask. Clients with fewer
batches are padded; a step with no valid example leaves adapters, optimizer state and
the method's running sums exactly as they were.

What differs between methods enters through the method's hooks (`methods/base.py`):
where a client starts, extra gradient terms, what it sums over its steps, what a pass over
its data after training adds up (FedNano's Fisher), and what it uploads and keeps at the end. Everything per client travels in one named pytree,
`ClientInputs`, whose leaves lead with the clients axis; everything shared (the frozen
backbone, the dataset, what the server broadcasts) is broadcast.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fednano_jax.data.batches import gather_batch
from fednano_jax.federated.objective import Wire, adapter_value_and_grad
from fednano_jax.models.adapter_ranks import apply_mask, rank_mask
from fednano_jax.models.loss import answer_tokens, summed_answer_nll


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClientInputs:
    """One client's (or, stacked, every client's) inputs to a round."""

    rows: jax.Array  # [steps, batch] row indices into the shared dataset
    valid: jax.Array  # [steps, batch] bool: False for padding
    state: Any = None  # the method's client state (None when it keeps none)
    rank: jax.Array | None = None  # its adapter rank (models/adapter_ranks.py); None: the full rank


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClientOutputs:
    upload: dict  # what the client sends the server: {"adapters": ..., "fisher": ..., ...}
    state: Any  # its new client state
    loss: jax.Array  # mean training loss over its real steps


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepGradients:
    """A step's gradients as a method may want them."""

    mean: Any  # of the mean answer NLL: what the optimizer follows
    summed: Any  # of the summed answer NLL of the batch (sum over its examples' answers)
    examples: jax.Array  # valid examples in the batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LocalResult:
    """What a client's local training produced, handed to the method's `client_final`."""

    start: Any  # adapters it started from
    adapters: Any  # adapters it ended with
    sums: Any  # the method's running sums over its steps
    steps: jax.Array  # real (unpadded) steps taken
    loss: jax.Array
    extra: Any = None  # the totals of the method's extra pass (None without one)


@dataclasses.dataclass(frozen=True)
class Model:
    """What a method's extra pass computes with: the split model and the shared dataset."""

    graphdef: Any
    frozen: Any
    data: dict


def run_extra_pass(method, model: Model, adapters, rows: jax.Array, valid: jax.Array):
    """The method's extra pass over rows, valid [steps, batch] at `adapters` -> its totals (None without one)."""
    totals = method.extra_pass_init(adapters)
    if totals is None:
        return None

    def step(totals, inputs):
        return method.extra_pass_step(totals, model, adapters, *inputs), None

    return jax.lax.scan(step, totals, (rows, valid))[0]


def tree_select(predicate, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), on_true, on_false)


def step_gradients(graphdef, frozen, adapters, batch, valid, wire: Wire = Wire()) -> tuple[jax.Array, StepGradients]:
    """-> (mean answer NLL, its gradients): one backward pass of the summed NLL, divided by the answer tokens."""
    summed_loss, summed = adapter_value_and_grad(graphdef, frozen, adapters, batch, summed_answer_nll, wire)
    tokens = jnp.maximum(answer_tokens(batch), 1.0)
    mean = jax.tree.map(lambda g: g / tokens, summed)
    return summed_loss / tokens, StepGradients(mean, summed, valid.sum())


def train_step(graphdef, optimizer: optax.GradientTransformation, method, frozen, data, broadcast, client_state,
               start, carry, step_rows, step_valid, mask=None):
    """One optimizer step on one batch: carry (adapters, optimizer state, sums) -> (new carry, loss).
    `mask`: the client's rank mask (None: full rank); the components it zeroes never move."""
    adapters, opt_state, sums = carry
    batch = gather_batch(data, step_rows, step_valid)
    loss, grads = step_gradients(graphdef, frozen, adapters, batch, step_valid, Wire.of(method.fed, step_rows, method.seed))
    direction = method.local_gradient(grads.mean, adapters, start, broadcast, client_state)
    sums = method.accumulate(sums, grads)
    if mask is not None:
        direction = apply_mask(direction, mask)
    updates, opt_state = optimizer.update(direction, opt_state, adapters)  # masked: zero step at zero weights
    return (optax.apply_updates(adapters, updates), opt_state, sums), loss


def client_mask(start, rank):
    """A client's rank mask over adapters shaped like `start`, or None for a client at the full rank."""
    return None if rank is None else rank_mask(start, rank)


def masked_upload(upload: dict, mask) -> dict:
    """What a client of a lower rank sends: each adapter-shaped tree with its components beyond the rank zeroed."""
    return upload if mask is None else {name: apply_mask(tree, mask) for name, tree in upload.items()}


def initial_carry(optimizer: optax.GradientTransformation, method, start):
    return start, optimizer.init(start), method.sums_init(start)


def extra_pass_rows(rows: jax.Array, valid: jax.Array, examples: int) -> tuple[jax.Array, jax.Array]:
    """The first `examples` examples of an epoch's schedule (all for 0), in as few steps as hold them.

    A client's schedule pads only after its examples (`schedule.client_schedule`), so its first
    ceil(examples / batch) steps hold them."""
    if not examples:
        return rows, valid
    steps = min(rows.shape[0], -(-examples // rows.shape[1]))
    rows, valid = rows[:steps], valid[:steps]
    return rows, valid & (jnp.cumsum(valid.reshape(-1)).reshape(valid.shape) <= examples)


def local_update(graphdef, optimizer: optax.GradientTransformation, method, steps_per_epoch: int, frozen, data,
                 broadcast, client: ClientInputs, extra_pass_examples: int = 0) -> ClientOutputs:
    """One client's local training, then the method's upload. `client.rows`: [epochs * steps_per_epoch, batch].

    A method's extra pass after training (FedNano's Fisher) sees the client's first epoch, or its first
    `extra_pass_examples` examples (`fed.fisher_examples`)."""
    start = method.local_start(broadcast, client.state)
    mask = client_mask(start, client.rank)
    start = start if mask is None else apply_mask(start, mask)
    step_active = client.valid.any(axis=1)

    def step(carry, inputs):
        step_rows, step_valid, active = inputs
        new_carry, loss = train_step(graphdef, optimizer, method, frozen, data, broadcast, client.state, start,
                                     carry, step_rows, step_valid, mask)
        return tree_select(active, new_carry, carry), loss

    carry = initial_carry(optimizer, method, start)
    (adapters, _, sums), losses = jax.lax.scan(step, carry, (client.rows, client.valid, step_active))
    steps = step_active.sum()
    loss = jnp.sum(losses * step_active) / jnp.maximum(steps, 1)
    epoch_rows, epoch_valid = extra_pass_rows(client.rows[:steps_per_epoch], client.valid[:steps_per_epoch],
                                              extra_pass_examples)
    extra = run_extra_pass(method, Model(graphdef, frozen, data), adapters, epoch_rows, epoch_valid)
    upload, state = method.client_final(LocalResult(start, adapters, sums, steps, loss, extra), broadcast,
                                        client.state)
    return ClientOutputs(masked_upload(upload, mask), state, loss)


def in_chunks(vmapped, chunk: int, devices: int = 1):
    """`vmapped(frozen, data, broadcast, clients [K])`, run `chunk` clients per device at a time.

    The K clients are `devices` equal blocks (the clients-axis shards of a mesh). Each block is padded
    with dummy clients (no valid step) to a multiple of `chunk`, and `lax.map` runs the chunks one after
    another, each a vmap over `devices * chunk` clients (one slice per device), so a device's memory is
    bounded by `chunk` clients whatever the cohort. The outputs equal one vmap over all K clients.
    """

    def run(frozen, data, broadcast, clients: ClientInputs) -> ClientOutputs:
        count = jax.tree.leaves(clients)[0].shape[0]
        per_device = count // devices
        if not chunk or chunk >= per_device or per_device * devices != count:
            return vmapped(frozen, data, broadcast, clients)
        steps = -(-per_device // chunk)

        def split(x):  # [K, ...] -> [steps, devices * chunk, ...]
            x = x.reshape((devices, per_device) + x.shape[1:])
            x = jnp.pad(x, [(0, 0), (0, steps * chunk - per_device)] + [(0, 0)] * (x.ndim - 2))
            x = jnp.swapaxes(x.reshape((devices, steps, chunk) + x.shape[2:]), 0, 1)
            return x.reshape((steps, devices * chunk) + x.shape[3:])

        def join(y):  # [steps, devices * chunk, ...] -> [K, ...]
            y = jnp.swapaxes(y.reshape((steps, devices, chunk) + y.shape[2:]), 0, 1)
            y = y.reshape((devices, steps * chunk) + y.shape[3:])[:, :per_device]
            return y.reshape((count,) + y.shape[2:])

        outputs = jax.lax.map(lambda part: vmapped(frozen, data, broadcast, part), jax.tree.map(split, clients))
        return jax.tree.map(join, outputs)

    return run


def make_client_programs(graphdef, optimizer, method, steps_per_epoch: int, client_chunk: int = 0,
                         devices: int = 1, extra_pass_examples: int = 0):
    """-> (vmapped, sequential): both map (frozen, data, broadcast, clients: ClientInputs [K]) to stacked
    ClientOutputs [K]. The vmapped one trains `client_chunk` clients per device at a time (0: all; see
    `in_chunks`). The sequential one loops clients in Python through the same jitted single-client update
    and gives the same numbers (for debugging and benchmarks)."""
    single = functools.partial(local_update, graphdef, optimizer, method, steps_per_epoch,
                               extra_pass_examples=extra_pass_examples)
    vmapped = in_chunks(jax.vmap(single, in_axes=(None, None, None, 0)), client_chunk, devices)
    single_jit = jax.jit(single)

    def sequential(frozen, data, broadcast, clients: ClientInputs) -> ClientOutputs:
        count = clients.rows.shape[0]
        results = [single_jit(frozen, data, broadcast, jax.tree.map(lambda x: x[k], clients)) for k in range(count)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *results)

    return vmapped, sequential
