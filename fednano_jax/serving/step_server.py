"""The split-step server: the frozen LLM behind gRPC, answering many clients' steps in one batched call.

A client sends its adapted embeddings and the rows the loss needs (`STEP_TENSORS`); the server runs the frozen
decoder and LM head and returns the client's loss and d loss / d embeddings (`embed_grads`), as the
simulation's wire does (`federated/objective.py`, labels on the server). Two kinds of step: `mean` (the mean
answer NLL of the client's batch) and `sum` (the summed NLL: the client's local step divides its gradients by
its answer tokens, and FedNano's Fisher pass takes each row's own, as the simulation does).

Concurrent requests are batched: the first waits up to `Limits.max_wait_ms` for others, up to
`Limits.max_rows` rows, and all run as one call. Rows never interact, so the sum over clients of each client's
loss has, at each client's embeddings, that client's own gradient. Shapes are bucketed (rows, sequence length
and answer slots to multiples of 8) so the server compiles a bounded number of programs.

A bad request (unknown client, bad token, a wrong name, dtype or shape, a size over the limit) is refused with
one sentence and never reaches the batch; every other client's steps go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hmac
import queue
import threading
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fednano_jax.models.loss import answer_token_log_probs, model_logits
from fednano_jax.serving.wire_format import WireError, decode, encode

SERVICE, STEP, STEP_STREAM = "fednano.SplitStep", "Step", "StepStream"
# gRPC refuses messages over 4 MiB by default; a larger request (and its reply) goes as a stream of chunks instead.
UNARY_LIMIT = 4 * 2**20 - 2**16
CHUNK = 2**20
KINDS = ("mean", "sum")  # the batch's answer NLL: its mean over the answer tokens, or its sum
# Evaluation decoding, one round trip per new token: each row's greedy next token after its last position. The
# client embeds the new token with its own text adapter and sends the grown sequence (no cache is kept here), so the
# server learns the generated tokens (which its logits give it anyway) and never an adapter.
NEXT = "next"
NEXT_TENSORS = {"embeds": (np.float32, 3), "attention_mask": (np.bool_, 2)}
# Labels on the client (`fed.labels_on_client`), two round trips per step: the logits at the answer slots
# (`logits`), then, with the client's d loss / d logits, the gradients at the embeddings (`backward`; the forward
# pass is recomputed, so the server keeps nothing between the two). No token id or label is sent; the logit
# gradients still give the answers away (softmax minus one-hot), see docs/deployment.md.
LOGITS_TENSORS = {"embeds": (np.float32, 3), "attention_mask": (np.bool_, 2), "answer_positions": (np.int32, 2)}
BACKWARD_TENSORS = {**LOGITS_TENSORS, "logit_grads": (np.float32, 3)}
UNBATCHED = {NEXT: NEXT_TENSORS, "logits": LOGITS_TENSORS, "backward": BACKWARD_TENSORS}
# name -> (dtype, rank): what a step request holds besides the header.
STEP_TENSORS = {"embeds": (np.float32, 3), "attention_mask": (np.bool_, 2), "input_ids": (np.int32, 2),
                "loss_mask": (np.bool_, 2), "answer_positions": (np.int32, 2), "answer_valid": (np.bool_, 2)}
# Why a split run refuses model.client_layers > 0 (commands/serve.py, experiment.check_split).
CLIENT_LAYERS_NOT_SERVED = ("model.client_layers must be 0 with a split-step server: it runs every decoder layer on "
                            "the embeddings it receives, and a client process holds NanoEdge alone.")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_rows: int = 64  # rows in one batched call (one request may not exceed it)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_bytes: int = 256 * 2**20  # one message
    max_length: int = 4096  # sequence positions
    request_timeout_s: float = 120.0  # a step not answered by then is failed with a sentence


def bucket(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def row_bucket(n: int, limit: int) -> int:
    """Rows of a merged batch: a multiple of 8 (at most limit / 8 programs, under 8 padding rows each)."""
    return min(bucket(n), max(limit, n))


@dataclasses.dataclass
class Request:
    client: int
    kind: str
    tensors: dict
    done: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class StepServer:
    """The frozen decoder (`server`, an nnx module: `LlamaDecoder`) serving `num_clients` clients; `tokens`:
    client id -> its secret (None: no token is asked for)."""

    def __init__(self, server, num_clients: int, tokens: dict[int, str] | None = None, limits: Limits = Limits()):
        self.graph, self.state = nnx.split(server)
        self.hidden, self.vocab = server.config.hidden_size, server.config.vocab_size
        self.num_clients, self.tokens, self.limits = num_clients, tokens, limits
        self.queue: queue.Queue[Request] = queue.Queue()
        self.stats = {"calls": 0, "requests": 0, "rows": 0, "padded_rows": 0, "refused": 0}
        self.stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._batches, name="split-step-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------ a request
    def handle(self, blob: bytes) -> bytes:
        """A step request's bytes -> the response's bytes (loss, embed_grads); raises WireError with the sentence
        for a request it refuses."""
        tensors, header = decode(blob, self.limits.max_bytes)
        client = self.authenticate(header)
        kind = header.get("kind", "")
        if kind in UNBATCHED:
            return self.unbatched(kind, tensors)
        if kind not in KINDS:
            raise WireError(f"kind must be one of {[*KINDS, *UNBATCHED]}, got {kind!r}.")
        self.check_step(tensors)
        request = Request(client, kind, tensors)
        self.queue.put(request)
        loss, grads = request.done.result(timeout=self.limits.request_timeout_s)
        return encode({"loss": np.asarray(loss, np.float32), "embed_grads": grads})

    def authenticate(self, header: dict) -> int:
        raw = header.get("client", "")
        if not raw.isdigit() or not int(raw) < self.num_clients:
            raise WireError(f"client must be a client id between 0 and {self.num_clients - 1}, got {raw!r}.")
        client = int(raw)
        held, given = self.tokens.get(client, "") if self.tokens else "", header.get("token", "")
        if self.tokens is not None and not hmac.compare_digest(held.encode(), given.encode()):  # any characters
            raise WireError(f"The token of client {client} is not the one this server holds for it.")
        return client

    def unbatched(self, kind: str, tensors: dict) -> bytes:
        """A decoding (`next`) or labels-on-the-client (`logits`, `backward`) request, served as it comes (one
        client's rows; decoding grows the sequence by one per token, so a prompt length compiles one program per
        new token) -> `next_ids` int32 [B], `logits` f32 [B, S, V] at the answer slots, or `embed_grads`."""
        rows, length = self.check_tensors(tensors, UNBATCHED[kind], ("attention_mask",), f"{kind!r} request")
        if not np.isfinite(tensors["embeds"]).all():
            raise WireError("embeds must be finite.")
        if kind == NEXT:
            reply = {"next_ids": served_next(self.graph, self.state, tensors["embeds"], tensors["attention_mask"])}
        else:
            reply = self.labels_on_client(kind, tensors, rows, length)
        self.count(calls=1, requests=1, rows=rows, padded_rows=rows)
        return encode({name: np.asarray(value) for name, value in reply.items()})

    def labels_on_client(self, kind: str, tensors: dict, rows: int, length: int) -> dict:
        positions = tensors["answer_positions"]
        if positions.shape[0] != rows or (positions.size and not 0 <= positions.min() <= positions.max() < length):
            raise WireError(f"answer_positions must be [{rows}, S] positions in [0, {length - 1}].")
        args = (self.graph, self.state, tensors["embeds"], tensors["attention_mask"], positions)
        if kind == "logits":
            return {"logits": served_logits(*args)}
        if tensors["logit_grads"].shape != (*positions.shape, self.vocab):
            raise WireError(f"logit_grads must be [{rows}, {positions.shape[1]}, {self.vocab}] as the logits, got "
                            f"{list(tensors['logit_grads'].shape)}.")
        if not np.isfinite(tensors["logit_grads"]).all():
            raise WireError("logit_grads must be finite.")
        return {"embed_grads": served_backward(*args, tensors["logit_grads"])}

    def check_tensors(self, tensors: dict, expected: dict, like_embeds: tuple[str, ...], what: str = "step"
                      ) -> tuple[int, int]:
        """The names, dtypes and ranks of `expected`, embeds within the limits and of the LLM's width, and the
        `like_embeds` tensors [rows, length] as embeds -> (rows, length); one sentence where they are not."""
        if set(tensors) != set(expected):
            raise WireError(f"A {what} holds the tensors "
                            f"{sorted(expected)}, got {sorted(tensors)}.")
        for name, (dtype, rank) in expected.items():
            value = tensors[name]
            if value.dtype != dtype or value.ndim != rank:
                raise WireError(f"{name} must be {np.dtype(dtype).name} of rank {rank}, "
                                f"got {value.dtype.name} of shape {value.shape}.")
        rows, length, hidden = tensors["embeds"].shape
        if hidden != self.hidden:
            raise WireError(f"embeds must have {self.hidden} features (the server LLM's), got {hidden}.")
        if not 1 <= rows <= self.limits.max_rows or not 2 <= length <= self.limits.max_length:
            raise WireError(f"embeds must have 1 to {self.limits.max_rows} rows of 2 to {self.limits.max_length} "
                            f"positions, got {rows} x {length}.")
        for name in like_embeds:
            if tensors[name].shape != (rows, length):
                raise WireError(f"{name} must be [{rows}, {length}] as embeds, got {list(tensors[name].shape)}.")
        return rows, length

    def check_step(self, tensors: dict) -> None:
        """The names, dtypes and shapes a step needs, in one sentence where they are not."""
        rows, length = self.check_tensors(tensors, STEP_TENSORS, ("attention_mask", "input_ids", "loss_mask"))
        slots = tensors["answer_positions"].shape
        if slots[0] != rows or tensors["answer_valid"].shape != slots:
            raise WireError(f"answer_positions and answer_valid must both be [{rows}, S], got "
                            f"{list(slots)} and {list(tensors['answer_valid'].shape)}.")
        positions, ids = tensors["answer_positions"], tensors["input_ids"]
        if positions.size and not (0 <= positions.min() and positions.max() < length - 1):
            raise WireError(f"answer_positions must lie in [0, {length - 2}] (a position predicts the next token).")
        if ids.size and not (0 <= ids.min() and ids.max() < self.vocab):
            raise WireError(f"input_ids must be token ids below the vocabulary's {self.vocab}.")
        if not np.isfinite(tensors["embeds"]).all():
            raise WireError("embeds must be finite.")

    # ------------------------------------------------------------------------------------------ batching
    def _batches(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch, rows = [first], len(first.tensors["embeds"])
            deadline = time.monotonic() + self.limits.max_wait_ms / 1000
            while rows < self.limits.max_rows:
                try:
                    nxt = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if rows + len(nxt.tensors["embeds"]) > self.limits.max_rows:
                    self.queue.put(nxt)  # it opens the next batch
                    break
                batch.append(nxt)
                rows += len(nxt.tensors["embeds"])
            self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        try:
            merged, segments, per_token, sizes = merge_requests([r.tensors for r in batch], [r.kind for r in batch],
                                                               self.limits.max_rows)
            losses, grads = served_step(self.graph, self.state, merged, segments, per_token)
            losses, grads = np.asarray(losses), np.asarray(grads)
        except Exception as error:  # noqa: BLE001 (the batch's clients are told; the server keeps serving)
            for request in batch:
                request.done.set_exception(error)
            return
        self.count(calls=1, requests=len(batch), rows=sum(sizes), padded_rows=len(segments))
        start = 0
        for index, (request, size) in enumerate(zip(batch, sizes)):
            length = request.tensors["embeds"].shape[1]
            request.done.set_result((losses[index], grads[start:start + size, :length]))
            start += size

    def warm(self, example: dict) -> int:
        """Compile the program of every row bucket that batches of requests shaped like `example` can fill (so no
        compilation lands in a timed step) -> how many programs."""
        rows, seen = len(example["embeds"]), set()
        for copies in range(1, self.limits.max_rows // rows + 1):
            size = row_bucket(copies * rows, self.limits.max_rows)
            if size not in seen:
                seen.add(size)
                merged, segments, per_token, _ = merge_requests([example] * copies, ["mean"] * copies,
                                                                self.limits.max_rows)
                jax.block_until_ready(served_step(self.graph, self.state, merged, segments, per_token))
        return len(seen)

    def count(self, **amounts) -> None:
        with self.stats_lock:
            for name, amount in amounts.items():
                self.stats[name] += amount

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)


def merge_requests(requests: list[dict], kinds: list[str], max_rows: int):
    """Requests -> (one bucketed batch, each row's request index (padding rows: `max_rows`, a segment of their
    own), per segment whether its loss is a mean over answer tokens [max_rows + 1], each request's rows). Rows
    are right-padded to the batch's length bucket (causal attention: a row's real positions do not see them) and
    answer slots with invalid ones. Only the buckets shape the compiled program, not the number of requests."""
    sizes = [len(r["embeds"]) for r in requests]
    length = bucket(max(r["embeds"].shape[1] for r in requests))
    slots = bucket(max(r["answer_positions"].shape[1] for r in requests))
    total = row_bucket(sum(sizes), max_rows)

    def padded(name, value):
        width = [(0, 0), (0, (slots if name.startswith("answer") else length) - value.shape[1])]
        return np.pad(value, width + [(0, 0)] * (value.ndim - 2))

    merged = {name: np.concatenate([padded(name, r[name]) for r in requests]) for name in STEP_TENSORS}
    filler = total - sum(sizes)  # copies of the first row that count for nothing
    merged = {name: np.concatenate([value, np.repeat(value[:1], filler, axis=0)]) for name, value in merged.items()}
    merged["answer_valid"][sum(sizes):] = False
    segments = np.concatenate([np.repeat(np.arange(len(requests)), sizes), np.full(filler, max_rows)])
    per_token = np.zeros(max_rows + 1, bool)
    per_token[:len(kinds)] = [kind == "mean" for kind in kinds]
    return merged, segments.astype(np.int32), per_token, sizes


@functools.partial(jax.jit, static_argnums=0)
def served_step(graph, state, batch: dict, segments, per_token):
    """-> (each segment's loss [len(per_token)], d (sum of the losses) / d embeds): a request's loss is its rows'
    mean answer NLL (mean) or summed NLL (sum); the last segment holds the padding rows (no valid answer
    slot: its loss and gradients are zero)."""
    def total(embeds):
        server = nnx.merge(graph, state)
        log_probs, mask = answer_token_log_probs(model_logits(server, embeds, batch), batch)
        nll = jax.ops.segment_sum(-log_probs.sum(axis=1), segments, len(per_token))
        tokens = jax.ops.segment_sum(mask.sum(axis=1), segments, len(per_token))
        losses = jnp.where(per_token, nll / jnp.maximum(tokens, 1.0), nll)
        return losses.sum(), losses

    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(batch["embeds"])
    return losses, grads


@functools.partial(jax.jit, static_argnums=0)
def served_next(graph, state, embeds, attention_mask):
    """Each row's greedy next token after its last position (prompts are left-padded, so that is its newest)."""
    server = nnx.merge(graph, state)
    last = jnp.full((embeds.shape[0], 1), embeds.shape[1] - 1)
    return jnp.argmax(server.logits_at(embeds, attention_mask, last)[:, 0], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def served_logits(graph, state, embeds, attention_mask, positions):
    """The logits at the answer slots [B, S, V]: what the client's loss reads (labels on the client)."""
    return nnx.merge(graph, state).logits_at(embeds, attention_mask, positions)


@functools.partial(jax.jit, static_argnums=0)
def served_backward(graph, state, embeds, attention_mask, positions, logit_grads):
    """d loss / d embeds from the client's d loss / d logits at the answer slots (the forward pass recomputed)."""
    _, backward = jax.vjp(lambda e: nnx.merge(graph, state).logits_at(e, attention_mask, positions), embeds)
    return backward(logit_grads)[0]


# ---------------------------------------------------------------------------------------------- gRPC
def grpc_server(steps: StepServer, address: str, credentials: grpc.ServerCredentials | None = None,
                workers: int = 32) -> tuple[grpc.Server, int]:
    """A started gRPC server answering `/fednano.SplitStep/Step` with raw bytes (no code generation) at
    `address` ("127.0.0.1:0": a free port) -> (server, its port)."""
    def step(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return steps.handle(request)
        except WireError as error:
            steps.count(refused=1)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except concurrent.futures.TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "The server did not answer the step in "
                          f"{steps.limits.request_timeout_s:g} s; retry it.")
        except Exception as error:  # noqa: BLE001 (the batch failed on the server: said in one sentence)
            context.abort(grpc.StatusCode.INTERNAL, f"The server failed the step ({type(error).__name__}: {error}).")

    def step_stream(chunks, context: grpc.ServicerContext):
        try:
            blob = joined(chunks, steps.limits.max_bytes)
        except WireError as error:
            steps.count(refused=1)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        yield from chunked(step(blob, context))

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        STEP: grpc.unary_unary_rpc_method_handler(step),
        STEP_STREAM: grpc.stream_stream_rpc_method_handler(step_stream)})
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers))  # gRPC's default sizes
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return server, port


def chunked(blob: bytes, size: int = CHUNK):
    """A message as the chunks of a stream."""
    for start in range(0, max(len(blob), 1), size):
        yield blob[start:start + size]


def joined(chunks, limit: int) -> bytes:
    """A streamed message, refused (WireError) as soon as it runs over `limit` bytes."""
    parts, total = [], 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise WireError(f"The message is over {total:,} bytes, over the server's limit of {limit:,}.")
        parts.append(chunk)
    return b"".join(parts)
