"""A client's end of the split-step link: send a batch's adapted embeddings, get the loss and their gradients.

Retries are bounded: a server that is down or restarting (gRPC UNAVAILABLE) is retried with exponential backoff
up to `attempts` times; a refusal (the server's sentence) or exhausted retries is a `SplitStepError` with one
sentence, never a silent wrong step.
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from fednano_jax.errors import SplitStepError
from fednano_jax.serving.step_server import SERVICE, STEP, STEP_STREAM, STEP_TENSORS, UNARY_LIMIT, chunked
from fednano_jax.serving.wire_format import decode, encode

RETRIED = (grpc.StatusCode.UNAVAILABLE,)
REMOTE_VALID = {"mean": 5, "sum": 5, "logits": 3, "backward": 3}  # where a wire call's answer_valid is


class StepClient:
    """Client `client` of the server at `address` ("127.0.0.1:PORT"); `token`: its secret, if the server asks
    for one; `root_certificates`: the server's certificate (PEM) for TLS, None for a plaintext channel."""

    def __init__(self, address: str, client: int, token: str = "", root_certificates: bytes | None = None,
                 timeout_s: float = 120.0, attempts: int = 5, backoff_s: float = 0.2, max_bytes: int = 256 * 2**20):
        self.channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
                        if root_certificates else grpc.insecure_channel(address))  # gRPC's default sizes
        self.call = self.channel.unary_unary(f"/{SERVICE}/{STEP}")
        self.stream = self.channel.stream_stream(f"/{SERVICE}/{STEP_STREAM}")
        self.address, self.client, self.token = address, client, token
        self.timeout_s, self.attempts, self.backoff_s, self.max_bytes = timeout_s, attempts, backoff_s, max_bytes
        self.bytes_sent = self.bytes_received = 0  # payloads (safetensors messages), without gRPC's framing
        self.streamed = 0  # requests over gRPC's default message size, sent as streams of chunks
        self.unary_limit = UNARY_LIMIT

    def step(self, embeds: np.ndarray, batch: dict, kind: str = "mean") -> tuple[float, np.ndarray]:
        """-> (the batch's loss, d loss / d embeds) for `embeds` [B, T, D] and the batch's rows (`STEP_TENSORS`)."""
        tensors = {"embeds": np.asarray(embeds, np.float32),
                   **{name: np.asarray(batch[name], dtype) for name, (dtype, _) in STEP_TENSORS.items()
                      if name != "embeds"}}
        request = encode(tensors, {"client": self.client, "token": self.token, "kind": kind})
        reply = self._send(request)
        tensors, _ = decode(reply, self.max_bytes)
        return float(tensors["loss"]), tensors["embed_grads"]

    def next_tokens(self, embeds, attention_mask, max_rows: int = 64) -> np.ndarray:
        """Evaluation decoding: each row's greedy next token id [B] after its last position, from the server's LLM
        (`embeds` [B, T, D]: the client's embeddings of the prompt and the tokens so far), `max_rows` rows a request."""
        embeds, mask = np.asarray(embeds, np.float32), np.asarray(attention_mask, bool)
        return np.concatenate([self.request({"embeds": embeds[start:start + max_rows],
                                             "attention_mask": mask[start:start + max_rows]}, "next")["next_ids"]
                               for start in range(0, len(embeds), max_rows)])

    def wire(self, *tensors, kind: str, vocab: int = 0):
        """The host function of a remote wire (`federated/objective.Wire.remote`, `Method.remote`), as float32 arrays:
        - `mean`/`sum` (labels on the server): (embeds, attention_mask, input_ids, loss_mask, answer_positions,
          answer_valid) -> (loss, d loss / d embeds);
        - `logits` (labels on the client): (embeds, attention_mask, answer_positions, answer_valid) -> the logits
          at the answer slots [B, S, `vocab`];
        - `backward`: the same and d loss / d logits -> d loss / d embeds.
        A step the simulation pads with (a client with fewer batches than the largest) has no answer token: its
        results are zero, and nothing crosses the link."""
        embeds, answer_valid = np.asarray(tensors[0], np.float32), np.asarray(tensors[REMOTE_VALID[kind]])
        if kind in ("mean", "sum"):
            if not answer_valid.any():
                return np.float32(0.0), np.zeros(embeds.shape, np.float32)
            names = ("attention_mask", "input_ids", "loss_mask", "answer_positions", "answer_valid")
            loss, grads = self.step(embeds, dict(zip(names, tensors[1:])), kind)
            return np.float32(loss), grads.astype(np.float32)
        attention_mask, positions = np.asarray(tensors[1], bool), np.asarray(tensors[2], np.int32)
        if kind == "logits":
            if not answer_valid.any():
                return np.zeros((*positions.shape, vocab), np.float32)
            request = {"embeds": embeds, "attention_mask": attention_mask, "answer_positions": positions}
            return self.request(request, kind)["logits"].astype(np.float32)
        if not answer_valid.any():
            return np.zeros(embeds.shape, np.float32)
        request = {"embeds": embeds, "attention_mask": attention_mask, "answer_positions": positions,
                   "logit_grads": np.asarray(tensors[4], np.float32)}
        return self.request(request, kind)["embed_grads"].astype(np.float32)

    def request(self, tensors: dict, kind: str) -> dict:
        """One request of `kind` -> the reply's tensors."""
        blob = encode(tensors, {"client": self.client, "token": self.token, "kind": kind})
        return decode(self._send(blob), self.max_bytes)[0]

    def _send(self, request: bytes) -> bytes:
        for attempt in range(self.attempts):
            try:
                reply = self._call(request)
            except grpc.RpcError as error:
                if error.code() not in RETRIED:
                    raise SplitStepError(f"The split-step server refused client {self.client}'s step: "
                                         f"{error.details()}") from None
                last = error.details()
                if attempt + 1 < self.attempts:
                    time.sleep(self.backoff_s * 2**attempt)
                continue
            self.bytes_sent += len(request)
            self.bytes_received += len(reply)
            return reply
        raise SplitStepError(f"The split-step server at {self.address} did not answer client {self.client} after "
                             f"{self.attempts} attempt{'s' if self.attempts != 1 else ''} ({last}).")

    def _call(self, request: bytes) -> bytes:
        """One request: a unary call, or a stream of chunks both ways where it is over gRPC's default size."""
        if len(request) <= self.unary_limit:
            return self.call(request, timeout=self.timeout_s)
        self.streamed += 1
        return b"".join(self.stream(chunked(request), timeout=self.timeout_s))

    def close(self) -> None:
        self.channel.close()
