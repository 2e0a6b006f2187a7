"""A throwaway certificate authority for local stacks and tests (production uses cert-manager or its own CA).

`LocalCA.create(folder)` makes an EC P-256 CA; `issue(identity)` makes a certificate for one
service identity (`router`, `generator/bard-small-0`, `operator`, ...) whose common name is the
identity and whose subject alternative names are its role (the name clients verify), `localhost`
and 127.0.0.1, valid for both server and client authentication. Files are written 0600 and read
back by `switchboard.common.tls` through the SWITCHBOARD_TLS_* variables.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from switchboard.common.tls import TlsIdentity, role_of

VALID_DAYS = 30


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _file_name(identity: str) -> str:
    return identity.replace("/", "--")


@dataclass(frozen=True)
class LocalCA:
    """A CA's certificate and key in `folder` (ca.pem, ca-key.pem)."""

    folder: Path

    @property
    def ca_file(self) -> Path:
        """The CA certificate every service trusts."""
        return self.folder / "ca.pem"

    @classmethod
    def create(cls, folder: Path, name: str = "switchboard local CA") -> LocalCA:
        """A new CA in `folder` (created 0700), replacing any there."""
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(folder)
        ca.ca_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_private(folder / "ca-key.pem", _key_pem(key))
        return ca

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        certificate = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        key = serialization.load_pem_private_key((self.folder / "ca-key.pem").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return certificate, key

    def issue(self, identity: str, extra_names: tuple[str, ...] = ()) -> TlsIdentity:
        """A certificate for `identity` (common name), its role and `extra_names` as DNS names; its TlsIdentity."""
        ca_certificate, ca_key = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(role_of(identity)), x509.DNSName("localhost")]
        names += [x509.DNSName(name) for name in extra_names]
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        base = self.folder / _file_name(identity)
        cert_file, key_file = base.with_suffix(".pem"), base.with_name(base.name + "-key.pem")
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_private(key_file, _key_pem(key))
        return TlsIdentity(self.ca_file, cert_file, key_file)


def identity_env(identity: TlsIdentity) -> dict[str, str]:
    """The SWITCHBOARD_TLS_* variables that give a process this identity."""
    from switchboard.common.tls import CA_ENV, CERT_ENV, KEY_ENV

    return {CA_ENV: str(identity.ca_file), CERT_ENV: str(identity.cert_file), KEY_ENV: str(identity.key_file)}
