"""Local client updates for any method: `lax.scan` over steps, `vmap` over the leading clients axis.

A client's data arrive as row indices `[steps, batch]` into a dataset shared by all
clients (broadcast, never copied per client) plus a validity mask. Clients with fewer
batches are padded; a step with no valid example leaves adapters, optimizer state and
the method's running sums exactly as they were.

There is one client program, `lane_update`: a lane trains its clients one after another
(`packing.py` lays several small clients end to end in a lane); an unpacked client is a lane of one
(`local_update`); vmap, sequential and chunked runs are ways to run that one program.

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
class SharedInputs:
    """What every client of a round shares, as a method's extra pass computes with it: the split model's graph
    and frozen backbone, and the dataset."""

    graphdef: Any
    frozen: Any
    data: dict


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
    wire = Wire.of(method.fed, step_rows, method.seed, method.remote)
    loss, grads = step_gradients(graphdef, frozen, adapters, batch, step_valid, wire)
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedLanes:
    """A round's cohort as lanes (leaves lead with [lanes]); P clients per lane, dummies where a lane has fewer."""

    rows: jax.Array  # [L, S, batch] row indices
    valid: jax.Array  # [L, S, batch]
    slot: jax.Array  # [L, S] which of the lane's clients the step trains
    first: jax.Array  # [L, S] the step is that client's first
    members: jax.Array  # [L, P] bool: the slot holds a client (not a dummy)
    extra_rows: jax.Array  # [L, X, batch]: each client's first epoch (or its first fed.fisher_examples), packed
    extra_valid: jax.Array  # [L, X, batch]
    extra_slot: jax.Array  # [L, X]
    state: Any = None  # the clients' states [L, P, ...] (None when the method keeps none)
    rank: jax.Array | None = None  # [L, P] the clients' adapter ranks (None: all at the full rank)


def _at(tree, index):
    return jax.tree.map(lambda x: x[index], tree)


def lane_update(graphdef, optimizer: optax.GradientTransformation, method, frozen, data, broadcast,
                lane: PackedLanes) -> ClientOutputs:
    """One lane's clients trained one after another, then their extra passes -> their ClientOutputs [P]."""
    width = lane.members.shape[0]
    states = lane.state
    if states is None:
        starts = jax.tree.map(lambda x: jnp.broadcast_to(x, (width,) + x.shape), method.local_start(broadcast, None))
    else:
        starts = jax.vmap(lambda state: method.local_start(broadcast, state))(states)
    masks = None if lane.rank is None else jax.vmap(client_mask)(starts, lane.rank)
    starts = starts if masks is None else apply_mask(starts, masks)
    mask_at = (lambda slot: None) if masks is None else (lambda slot: _at(masks, slot))

    def fresh(slot):
        adapters, opt_state, sums = initial_carry(optimizer, method, _at(starts, slot))
        return adapters, opt_state, sums, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)

    def kept(carry):  # what a client's slot keeps of its carry (its optimizer state is not needed after)
        adapters, _, sums, loss_sum, steps = carry
        return adapters, sums, loss_sum, steps

    def step(state, inputs):
        carry, buffers = state
        step_rows, step_valid, slot, first = inputs
        carry = tree_select(first, fresh(slot), carry)
        core, loss = train_step(graphdef, optimizer, method, frozen, data, broadcast,
                                None if states is None else _at(states, slot), _at(starts, slot),
                                carry[:3], step_rows, step_valid, mask_at(slot))
        carry = tree_select(step_valid.any(), (*core, carry[3] + loss, carry[4] + 1), carry)
        buffers = jax.tree.map(lambda buffer, value: buffer.at[slot].set(value), buffers, kept(carry))
        return (carry, buffers), None

    buffers = jax.vmap(lambda p: kept(fresh(p)))(jnp.arange(width))
    (_, buffers), _ = jax.lax.scan(step, (fresh(0), buffers), (lane.rows, lane.valid, lane.slot, lane.first))
    adapters, sums, loss_sums, steps = buffers
    extras = lane_extra_pass(method, SharedInputs(graphdef, frozen, data), adapters, lane)

    def final(start, adapters, sums, loss_sum, steps, extra, state, mask):
        loss = loss_sum / jnp.maximum(steps, 1)
        upload, new_state = method.client_final(LocalResult(start, adapters, sums, steps, loss, extra), broadcast,
                                                state)
        return ClientOutputs(masked_upload(upload, mask), new_state, loss)

    return jax.vmap(final)(starts, adapters, sums, loss_sums, steps, extras, states, masks)


def lane_extra_pass(method, shared: SharedInputs, adapters, lane: PackedLanes):
    """The method's extra pass for each of the lane's clients, at its trained adapters [P] -> totals [P] (or None)."""
    totals = jax.vmap(method.extra_pass_init)(adapters)
    if totals is None:
        return None

    def step(totals, inputs):
        rows, valid, slot = inputs
        mine = _at(totals, slot)
        added = method.extra_pass_step(mine, shared, _at(adapters, slot), rows, valid)
        added = tree_select(valid.any(), added, mine)
        return jax.tree.map(lambda total, value: total.at[slot].set(value), totals, added), None

    return jax.lax.scan(step, totals, (lane.extra_rows, lane.extra_valid, lane.extra_slot))[0]


def make_packed_program(graphdef, optimizer, method):
    """(frozen, data, broadcast, PackedLanes [L]) -> ClientOutputs [L, P], vmapped over lanes."""

    def lane(frozen, data, broadcast, one: PackedLanes):
        return lane_update(graphdef, optimizer, method, frozen, data, broadcast, one)

    return jax.vmap(lane, in_axes=(None, None, None, 0))


def single_lane(client: ClientInputs, steps_per_epoch: int, extra_pass_examples: int = 0) -> PackedLanes:
    """One client's inputs as a lane of one: its steps in order, its extra pass over its first epoch (or its
    first `extra_pass_examples` examples)."""
    steps = client.rows.shape[0]
    extra_rows, extra_valid = extra_pass_rows(client.rows[:steps_per_epoch], client.valid[:steps_per_epoch],
                                              extra_pass_examples)
    return PackedLanes(client.rows, client.valid, jnp.zeros(steps, jnp.int32), jnp.arange(steps) == 0,
                       jnp.ones(1, bool), extra_rows, extra_valid, jnp.zeros(extra_rows.shape[0], jnp.int32),
                       jax.tree.map(lambda x: x[None], client.state), None if client.rank is None else client.rank[None])


def local_update(graphdef, optimizer: optax.GradientTransformation, method, steps_per_epoch: int, frozen, data,
                 broadcast, client: ClientInputs, extra_pass_examples: int = 0) -> ClientOutputs:
    """One client's local training, then the method's upload: the lane program (`lane_update`) on a lane of one.
    `client.rows`: [epochs * steps_per_epoch, batch]. A method's extra pass after training (FedNano's Fisher)
    sees the client's first epoch, or its first `extra_pass_examples` examples (`fed.fisher_examples`)."""
    lane = single_lane(client, steps_per_epoch, extra_pass_examples)
    return jax.tree.map(lambda x: x[0], lane_update(graphdef, optimizer, method, frozen, data, broadcast, lane))


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
