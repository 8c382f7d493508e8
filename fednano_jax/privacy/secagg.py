"""Secure aggregation (Bonawitz et al. 2017), simulated round by round: the server learns the sums the
aggregate needs and nothing about one client's upload.

FedAvg needs Σ_k w_k θ_k; FedNano's Fisher merge needs Σ_k w_k F_k θ_k and Σ_k w_k F_k (F floored, as
today); the weights' sum is public (the cohort's example counts). Each client, on its own:

1. quantises its contribution to fixed point (`FRACTION_BITS` bits) in the ring Z_{2^64};
2. agrees a seed with every other client of the cohort by X25519 key exchange (`cryptography`), expands
   it with ChaCha20 into a pairwise mask, added by the lower id and subtracted by the higher, so that
   the masks cancel in the sum; and adds a self mask from a seed of its own (double masking: a late
   upload cannot be unmasked once the client has been declared dropped);
3. Shamir-shares (threshold t, over GF(2^521 - 1)) its X25519 private key and its self-mask seed with
   the cohort.

The server receives only masked vectors. For the clients that dropped out after sharing, the survivors
send their shares of the dropped clients' private keys, and the server removes the dropped clients'
pairwise masks from the survivors' sum; for survivors, shares of their self-mask seeds, and it removes
those masks. Fewer than t survivors: the round is void and the global adapters stay. The sum, read
back from fixed point, equals the plain aggregate up to the quantisation error (at most 2^-(f+1) per
client and entry).

A client whose own upload is not finite leaves before masking (it would poison the sum, and the server
could no longer tell). Keys and seeds are drawn from the run's streams (seed, round, client), so a
resumed run repeats them: a simulation of the protocol, not a deployment of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fednano_jax.streams import Purpose, generator

FRACTION_BITS = 40  # a step of 9e-13: FedNano's w F theta at a floored Fisher is ~1e-7; range +-2^22
SCALE = float(2 ** FRACTION_BITS)
PRIME = 2 ** 521 - 1  # a Mersenne prime: a 256-bit secret is one field element
KEY_BYTES = 32
SHARE_BYTES = 66  # one GF(2^521 - 1) element
QUANTISED_BYTES = 8  # one Z_{2^64} entry (the plain upload's float32 is 4)


def majority_threshold(cohort_size: int) -> int:
    """The survivors needed to unmask when fed.secagg_threshold is 0: a majority of the cohort."""
    return cohort_size // 2 + 1


# ------------------------------------------------------------------ primitives
def quantise(values: np.ndarray) -> np.ndarray:
    """float -> Z_{2^64} fixed point (two's complement), rounding to the nearest 2^-FRACTION_BITS."""
    scaled = np.round(np.asarray(values, np.float64) * SCALE)
    if np.abs(scaled).max(initial=0) >= 2.0 ** 62:
        raise ValueError("A secure-aggregation contribution is too large for the fixed-point ring.")
    return scaled.astype(np.int64).view(np.uint64)


def dequantise(ring: np.ndarray) -> np.ndarray:
    return ring.view(np.int64).astype(np.float64) / SCALE


def expand(seed: bytes, length: int) -> np.ndarray:
    """The ChaCha20 keystream of `seed` as `length` uint64 (a PRG: the same seed, the same mask)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (8 * length)), np.uint64).copy()


def agreed_seed(private: X25519PrivateKey, public: bytes) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"fednano_jax secagg pairwise mask").derive(shared)


def shamir_split(secret: int, holders: list[int], threshold: int, rng: np.random.Generator) -> dict[int, int]:
    """Shares of `secret` at x = holder + 1 of a random degree t-1 polynomial over GF(PRIME)."""
    coefficients = [secret] + [int.from_bytes(rng.bytes(65), "big") % PRIME for _ in range(threshold - 1)]
    return {h: sum(c * pow(h + 1, i, PRIME) for i, c in enumerate(coefficients)) % PRIME for h in holders}


def shamir_combine(shares: dict[int, int]) -> int:
    """The secret (the polynomial at 0) from at least t shares, by Lagrange interpolation."""
    xs = {h: h + 1 for h in shares}
    secret = 0
    for h, y in shares.items():
        numerator, denominator = 1, 1
        for other, x in xs.items():
            if other != h:
                numerator = numerator * (-x) % PRIME
                denominator = denominator * (xs[h] - x) % PRIME
        secret = (secret + y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


# ------------------------------------------------------------------ one round of the protocol
@dataclasses.dataclass
class Client:
    """One cohort member's secrets and what it received from the others."""

    index: int  # its place in the cohort
    private: X25519PrivateKey
    public: bytes
    self_seed: bytes
    shares_held: dict = dataclasses.field(default_factory=dict)  # (owner, "key" | "self") -> share


class SecureRound:
    """The protocol for one cohort: `setup` (keys and shares), `mask` (each client), `unmask` (the server)."""

    def __init__(self, cohort_size: int, threshold: int, seed: int, round_index: int, client_ids):
        if not 1 <= threshold <= cohort_size:
            raise ValueError(f"fed.secagg_threshold must be between 1 and the cohort size {cohort_size}, "
                             f"got {threshold}.")
        self.threshold = threshold
        self.clients = []
        for index, client_id in enumerate(client_ids):
            rng = generator(seed, Purpose.SECAGG_KEYS, round_index, int(client_id))
            private = X25519PrivateKey.from_private_bytes(rng.bytes(KEY_BYTES))
            public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self.clients.append(Client(index, private, public, rng.bytes(KEY_BYTES)))
        self._share_secrets(seed, round_index, client_ids)

    def _share_secrets(self, seed, round_index, client_ids):
        holders = list(range(len(self.clients)))
        for client, client_id in zip(self.clients, client_ids):
            rng = generator(seed, Purpose.SECAGG_SHARES, round_index, int(client_id))
            for kind, secret in (("key", _private_bytes(client.private)), ("self", client.self_seed)):
                for holder, share in shamir_split(int.from_bytes(secret, "big"), holders, self.threshold, rng).items():
                    self.clients[holder].shares_held[(client.index, kind)] = share

    def mask(self, index: int, contribution: np.ndarray) -> np.ndarray:
        """Client `index`'s masked vector of its (float) contribution."""
        me = self.clients[index]
        masked = quantise(contribution) + expand(me.self_seed, contribution.size)
        for other in self.clients:
            if other.index != index:
                pairwise = expand(agreed_seed(me.private, other.public), contribution.size)
                masked = masked + pairwise if index < other.index else masked - pairwise
        return masked

    def unmask(self, masked: dict[int, np.ndarray], length: int) -> np.ndarray | None:
        """The server's side: the float sum of the survivors' contributions from their masked vectors and the
        survivors' shares, or None when fewer than the threshold survived."""
        survivors = sorted(masked)
        if len(survivors) < self.threshold:
            return None
        total = np.zeros(length, np.uint64)
        for vector in masked.values():
            total = total + vector
        for owner in survivors:  # survivors' self masks
            total = total - expand(self._reconstructed(owner, "self", survivors), length)
        for dropped in (c.index for c in self.clients if c.index not in masked):
            private = X25519PrivateKey.from_private_bytes(self._reconstructed(dropped, "key", survivors))
            for survivor in survivors:  # the dropped client's pairwise masks left in the survivors' vectors
                pairwise = expand(agreed_seed(private, self.clients[survivor].public), length)
                total = total - pairwise if survivor < dropped else total + pairwise
        return dequantise(total)

    def _reconstructed(self, owner: int, kind: str, survivors: list[int]) -> bytes:
        shares = {h: self.clients[h].shares_held[(owner, kind)] for h in survivors[: self.threshold]}
        return shamir_combine(shares).to_bytes(KEY_BYTES, "big")

    def extra_bytes_per_client(self, length: int) -> int:
        """What a client sends beyond its plain float32 upload: its public key, its two secrets' shares for
        every other member, the wider masked entries, and at unmasking its shares for the others."""
        others = len(self.clients) - 1
        return KEY_BYTES + 2 * others * SHARE_BYTES + (QUANTISED_BYTES - 4) * length + others * SHARE_BYTES

