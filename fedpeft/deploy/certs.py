"""TLS material for a SuperLink: a private CA and a server certificate signed by it.

Flower's SuperLink serves the Fleet, Control and Runtime APIs on one TLS port
(``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``); SuperNodes and ``flwr`` verify it with
the CA certificate (``--root-certificates`` / ``root-certificates``). The SuperLink's own
SuperExec reaches the Runtime API over ``127.0.0.1``, so ``localhost`` and ``127.0.0.1`` are
always in the certificate's subject alternative names, next to the hostnames given.

Usage::

    python -m fedpeft.deploy.certs --out certs --host superlink.example.org --host 10.0.0.5

writes ``ca.crt`` (give it to every SuperNode and ``flwr`` user), ``ca.key`` (keep offline),
``server.pem`` and ``server.key`` (SuperLink only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.atomic import write_private, write_public

ALWAYS_NAMES = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    """Keys are created 0600 and renamed into place (never readable by others, not even
    before a chmod); certificates 0644."""
    (write_private if private else write_public)(path, data)


def unique_names(hosts: list[str]) -> list[str]:
    """Given hostnames/IPs plus ``localhost`` and ``127.0.0.1``, without duplicates, in order."""
    out: list[str] = []
    for h in [*hosts, *ALWAYS_NAMES]:
        h = h.strip()
        if h and h not in out:
            out.append(h)
    return out


def generate(out: str | Path, hosts: list[str], days: int = DEFAULT_DAYS,
             overwrite: bool = False) -> TlsFiles:
    """Create a CA and a server certificate valid for ``hosts`` (+ localhost, 127.0.0.1)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    existing = [p for p in vars(files).values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True (--force) to replace it")
    names = unique_names(hosts)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # clock skew margin
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(files.ca_key, _key_pem(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _key_pem(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.deploy.certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for ca.crt, ca.key, server.pem, server.key")
    parser.add_argument("--host", action="append", default=[],
                        help="SuperLink hostname or IP as SuperNodes reach it (repeatable); "
                             "localhost and 127.0.0.1 are always added")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    try:
        files = generate(args.out, args.host, args.days, overwrite=args.force)
    except FileExistsError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"CA certificate (give to SuperNodes and flwr): {files.ca_cert}")
    print(f"CA key (keep offline):                        {files.ca_key}")
    print(f"SuperLink certificate: {files.server_cert}  (names: {', '.join(unique_names(args.host))})")
    print(f"SuperLink key:         {files.server_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
