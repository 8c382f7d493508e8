"""Self-signed TLS for one machine, and SuperNode keys: what `python -m fednano_jax.deploy` makes for a federation
on localhost (`cryptography`). For machines of your own, use certificates your organisation issues
(docs/deployment.md)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class LocalTls:
    authority: str  # the CA's certificate (PEM): what clients trust
    certificate: str  # the server's certificate for localhost and 127.0.0.1, signed by the CA
    key: str  # the server's private key


def _write(path: str, data: bytes, private: bool = False) -> str:
    with open(path, "wb") as file:
        file.write(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def local_tls(directory: str, days: int = 30) -> LocalTls:
    """A CA and a server certificate for localhost / 127.0.0.1 it signs, written to `directory`."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fednano_jax local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid[0]).not_valid_after(valid[1])
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    return LocalTls(_write(os.path.join(directory, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM)),
                    _write(os.path.join(directory, "server.pem"), server.public_bytes(serialization.Encoding.PEM)),
                    _write(os.path.join(directory, "server.key"), _private_pem(key), private=True))


def node_key(directory: str, name: str) -> tuple[str, str]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format) -> (private key path, public key path)."""
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (_write(os.path.join(directory, name), private, private=True),
            _write(os.path.join(directory, f"{name}.pub"), public))
