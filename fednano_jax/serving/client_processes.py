"""Every client as its own process: the round driver's end (`ClientProcesses`) and the client's (`RemoteClient`,
`serve_rounds`).

Under `python -m fednano_jax.main --split_server=HOST:PORT` the round driver (`federated/rounds.py`) keeps the
rounds, the aggregation and the evaluation; each sampled client trains in its own process, which holds NanoEdge
alone (`backbone/family/base.Family.edge`) and sends every step's embeddings to the split-step server. The driver
hands a client its round over the process's stdin (the broadcast, its row schedule, its state) and reads the
result from its stdout (its upload, new state and loss): one length-prefixed safetensors message each way, as on
the split link (no pickle). A client's own prints go to its log file, never into the messages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import resource
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.errors import ClientProcessError
from fednano_jax.federated.client import ClientInputs, ClientOutputs, local_update
from fednano_jax.serving.step_client import StepClient
from fednano_jax.serving.wire_format import decode, encode

LENGTH = struct.Struct("<Q")
MAX_MESSAGE = 2**34  # a round's message: adapters, a row schedule and a client state, far below this
TREES = "trees"  # the header entry holding the messages' tree skeletons


@dataclasses.dataclass(frozen=True)
class SplitLink:
    """Where the clients' wires go: the split-step server's `address` (HOST:PORT), each client's `tokens` (client id
    -> token, as the server's --tokens file), the server's certificate for TLS (`root_certificates`, PEM)."""

    address: str
    tokens: dict[int, str] | None = None
    root_certificates: bytes | None = None


class LinkedDecoders:
    """The round driver's evaluation over the split link: `decoders(k)` -> client k's `next_tokens` (a StepClient with
    its id and token), so each client's test rows are decoded as that client."""

    def __init__(self, link: SplitLink):
        self.link, self.clients = link, {}

    def __call__(self, client: int) -> Callable:
        if client not in self.clients:
            token = (self.link.tokens or {}).get(client, "")
            self.clients[client] = StepClient(self.link.address, client, token, self.link.root_certificates)
        return self.clients[client].next_tokens

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


# ------------------------------------------------------------------------------------------ the messages
def _skeleton(tree):
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {key: _skeleton(value) for key, value in tree.items()}
    return 0


def _flat(name: str, tree, out: dict) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _flat(f"{name}/{key}", value, out)
    elif tree is not None:
        out[name] = np.asarray(tree)


def _rebuilt(name: str, skeleton, tensors: dict):
    if skeleton is None:
        return None
    if isinstance(skeleton, dict):
        return {key: _rebuilt(f"{name}/{key}", value, tensors) for key, value in skeleton.items()}
    return tensors[name]


def pack(trees: dict[str, Any], header: dict | None = None) -> bytes:
    """Named trees (nested dicts of arrays, or None) and string header fields as one safetensors blob."""
    tensors: dict[str, np.ndarray] = {}
    for name, tree in trees.items():
        _flat(name, tree, tensors)
    skeletons = json.dumps({name: _skeleton(tree) for name, tree in trees.items()})
    return encode(tensors, {**(header or {}), TREES: skeletons})


def unpack(blob: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """-> (named trees, header) of a `pack`ed blob."""
    tensors, header = decode(blob, MAX_MESSAGE)
    skeletons = json.loads(header.pop(TREES, "{}"))
    return {name: _rebuilt(name, skeleton, tensors) for name, skeleton in skeletons.items()}, header


def write_message(stream: BinaryIO, blob: bytes) -> None:
    stream.write(LENGTH.pack(len(blob)) + blob)
    stream.flush()


def read_message(stream: BinaryIO) -> bytes | None:
    """The next message, or None at the end of the stream."""
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None
    (length,) = LENGTH.unpack(head)
    blob = stream.read(length)
    return blob if len(blob) == length else None


# ------------------------------------------------------------------------------------ the driver's end
class ClientProcess:
    """One client's process: its messages are read by a thread into a queue, so every wait has a deadline."""

    def __init__(self, client: int, command: list[str], log_path: str):
        self.client, self.log_path = client, log_path
        self.log = open(log_path, "ab")
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        except OSError:
            self.log.close()
            raise
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while (blob := read_message(self.process.stdout)) is not None:
            self.replies.put(blob)
        self.replies.put(None)

    def send(self, blob: bytes) -> None:
        try:
            write_message(self.process.stdin, blob)
        except (BrokenPipeError, OSError):
            pass  # the process is gone; its reply queue says so

    def reply(self, deadline: float) -> tuple[dict, dict]:
        """-> (trees, header) of the next reply, or a ClientProcessError sentence (its process ended, or the
        deadline passed, or it reported an error)."""
        try:
            blob = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise ClientProcessError(f"it did not answer in time (log: {self.log_path}).") from None
        if blob is None:
            self.replies.put(None)
            raise ClientProcessError(f"its process ended (exit code {self.process.wait()}; log: {self.log_path}).")
        trees, header = unpack(blob)
        if "error" in header:
            raise ClientProcessError(header["error"])
        return trees, header

    def stop(self, grace_s: float = 10.0) -> None:
        """Close its stdin (it exits at the end of its messages), then terminate and kill it if it lingers."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        for stop in (lambda: None, self.process.terminate, self.process.kill):
            stop()
            try:
                self.process.wait(timeout=grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


class ClientProcesses:
    """A process per client (`command(client)` starts one), started together and stopped together (also on
    failure: use it as a context manager). `hello`: what every client is told first (header fields)."""

    def __init__(self, num_clients: int, command: Callable[[int], list[str]], log_dir: str,
                 hello: Callable[[int], dict], start_timeout_s: float = 900.0, round_timeout_s: float = 3600.0):
        os.makedirs(log_dir, exist_ok=True)
        self.round_timeout_s = round_timeout_s
        self.processes: list[ClientProcess] = []
        self.ready: list[dict] = []  # what each client said when ready (the weights it holds, its data's shape)
        try:
            for k in range(num_clients):
                self.processes.append(ClientProcess(k, command(k), os.path.join(log_dir, f"client_{k}.log")))
                self.processes[k].send(pack({}, {"kind": "hello", **hello(k)}))
            deadline = time.monotonic() + start_timeout_s
            for process in self.processes:
                self._wait_ready(process, deadline)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, process: ClientProcess, deadline: float) -> None:
        """Its "ready": NanoEdge and the data loaded, its split link set up."""
        try:
            _, header = process.reply(deadline)
        except ClientProcessError as error:
            raise ClientProcessError(f"Client {process.client}'s process did not start: {error}") from None
        self.ready.append({key: int(value) for key, value in header.items() if value.isdigit()})

    def __enter__(self) -> "ClientProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for process in self.processes:
            process.stop()

    def local_updates(self, method: str, plain: bool, epoch_steps: int, broadcast, cohort: np.ndarray,
                      clients: ClientInputs) -> tuple[ClientOutputs, list[str | None], list[dict]]:
        """The cohort's local updates, each in its client's process, all at once -> (ClientOutputs [K] in cohort
        order, why each client failed or None, what each one's traffic was). A failed client's row holds another's
        outputs (it is left out of the aggregate); a round no client finished is a ClientProcessError."""
        broadcast = jax.tree.map(np.asarray, broadcast)
        header = {"kind": "train", "method": method, "plain": str(int(plain)), "epoch_steps": str(epoch_steps)}
        for i, k in enumerate(cohort):
            row = jax.tree.map(lambda x: np.asarray(x[i]), clients)
            trees = {"broadcast": broadcast, "rows": row.rows, "valid": row.valid, "state": row.state,
                     "rank": row.rank}
            self.processes[k].send(pack(trees, header))
        deadline = time.monotonic() + self.round_timeout_s
        results, failures, traffic = [], [], []
        for k in cohort:
            try:
                trees, reply = self.processes[k].reply(deadline)
            except ClientProcessError as error:
                results.append(None), failures.append(str(error)), traffic.append({})
                continue
            results.append(trees), failures.append(None)
            traffic.append({**{key: int(reply[key]) for key in ("split_sent", "split_received", "peak_rss")},
                            "upload": len(pack({"upload": trees["upload"]}))})
        finished = [r for r in results if r is not None]
        if not finished:
            said = "; ".join(f"client {k}: {reason}" for k, reason in zip(cohort, failures))
            raise ClientProcessError(f"no client finished its update ({said})")
        stacked = [r or finished[0] for r in results]
        outputs = jax.tree.map(lambda *xs: np.stack(xs),
                               *[ClientOutputs(r["upload"], r["state"], r["loss"]) for r in stacked])
        return outputs, failures, traffic


# ------------------------------------------------------------------------------------ the client's end
class RemoteClient:
    """A client process's work: the simulation's one client program (`client.local_update`) on NanoEdge alone,
    its wire going to the split-step server (`remote`, a StepClient's `wire`). Programs are compiled once per
    (method, plain, steps per epoch)."""

    def __init__(self, graphdef, frozen, data: dict, make_method: Callable[[str], Any],
                 make_optimizer: Callable, remote: Callable):
        self.graphdef, self.frozen, self.data = graphdef, frozen, data
        self.make_method, self.make_optimizer, self.remote = make_method, make_optimizer, remote
        self.programs: dict = {}
        self.link_error: Exception | None = None  # what the wire raised inside the program (XLA wraps it)

    def wire(self, *args, **kwargs):
        try:
            return self.remote(*args, **kwargs)
        except Exception as error:
            self.link_error = error
            raise

    def program(self, name: str, plain: bool, epoch_steps: int) -> Callable:
        key = (name, plain, epoch_steps)
        if key not in self.programs:
            method = self.make_method(name)
            method = method.plain() if plain else method
            method.remote = self.wire
            self.programs[key] = jax.jit(lambda frozen, data, broadcast, client: local_update(
                self.graphdef, self.make_optimizer(method.fed), method, epoch_steps, frozen, data, broadcast, client,
                method.extra_pass_examples))
        return self.programs[key]

    def train(self, trees: dict, header: dict) -> dict:
        """One round's local update -> its upload, new state and mean loss (host arrays)."""
        program = self.program(header["method"], header["plain"] == "1", int(header["epoch_steps"]))
        rank = None if trees["rank"] is None else jnp.asarray(trees["rank"])
        client = ClientInputs(jnp.asarray(trees["rows"]), jnp.asarray(trees["valid"]), trees["state"], rank)
        self.link_error = None
        try:
            outputs = jax.block_until_ready(program(self.frozen, self.data, trees["broadcast"], client))
        except Exception:
            if self.link_error is not None:  # the link's own sentence, not XLA's wrapping of it
                raise self.link_error from None
            raise
        return {"upload": outputs.upload, "state": outputs.state, "loss": outputs.loss}


def edge_client(config, client_id: int, address: str, token: str, certificate: bytes | None):
    """-> (RemoteClient, StepClient, what it holds, the federated data) of client `client_id` of the experiment
    (`config.read`'s Experiment): NanoEdge alone and the data, its wire to the split-step server at `address`."""
    import jax

    from fednano_jax.backbone.family import family_of
    from fednano_jax.data import datasets, pipeline
    from fednano_jax.data.batches import device_dataset
    from fednano_jax.data.partition import Partition
    from fednano_jax.federated.methods import get_method
    from fednano_jax.federated.rounds import make_optimizer
    from fednano_jax.parallel.xla_stats import use_compilation_cache_of

    use_compilation_cache_of(config)
    graphdef, frozen, _, tokenizer, mcfg = family_of(config).edge(config)
    splits = datasets.load_splits(config)
    data = pipeline.federated_data(splits, tokenizer, mcfg.vision.num_image_tokens, config.fed.num_clients,
                                   Partition.of(config.data), config.seed)
    device_data = device_dataset(data.train, data.images, config.data.stream_images)
    link = StepClient(address, client_id, token, certificate)
    client = RemoteClient(graphdef, frozen, device_data, lambda name: get_method(name, config.fed, config.seed),
                          make_optimizer, link.wire)
    held = {"weights_bytes": sum(x.nbytes for x in jax.tree.leaves(frozen)), "positions": data.train.input_ids.shape[1],
            "image_tokens": mcfg.vision.num_image_tokens}
    return client, link, held, data


def serve_rounds(incoming: BinaryIO, outgoing: BinaryIO, train: Callable[[dict, dict], dict],
                 traffic: Callable[[], dict], expected: tuple[type, ...]) -> None:
    """Answer the driver's `train` messages until its stream ends. An error of a kind in `expected` (the split
    link's) is answered with its sentence and the process goes on; any other ends it."""
    while (blob := read_message(incoming)) is not None:
        trees, header = unpack(blob)
        before = traffic()
        try:
            result = jax.tree.map(np.asarray, train(trees, header))
        except expected as error:
            write_message(outgoing, pack({}, {"error": str(error)}))
            continue
        after = traffic()
        counts = {key: after[key] - before[key] for key in after} | {"peak_rss": peak_rss_bytes()}
        write_message(outgoing, pack(result, {key: str(value) for key, value in counts.items()}))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """(stdin, stdout) as the message streams of a client process; its own prints go to stderr (its log)."""
    outgoing = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return sys.stdin.buffer, outgoing
