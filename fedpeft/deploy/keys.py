"""SuperNode authentication keys (EC P-384, OpenSSH format, as Flower 1.42 expects).

With ``flower-superlink --enable-supernode-auth`` a SuperNode may connect only after its
*public* key was registered with the SuperLink (``flwr supernode register <key.pub> <conn>``,
run by the federation operator). The SuperNode proves possession of the private key
(``flower-supernode --auth-supernode-private-key <key>``) on every request. A node whose
key is not registered is refused.

Usage::

    python -m fedpeft.deploy.keys --out keys --name supernode-0 --name supernode-1

writes ``keys/supernode-0`` (private, stays on that machine) and ``keys/supernode-0.pub``
(send to the operator).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.atomic import write_private, write_public


@dataclass(frozen=True)
class NodeKey:
    name: str
    private: Path
    public: Path


def generate(out: str | Path, name: str, overwrite: bool = False) -> NodeKey:
    """One P-384 key pair: ``<out>/<name>`` (0600) and ``<out>/<name>.pub``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = NodeKey(name, out / name, out / f"{name}.pub")
    if not overwrite and (key.private.exists() or key.public.exists()):
        raise FileExistsError(f"{key.private} exists; pass overwrite=True (--force) to replace it")
    private = ec.generate_private_key(ec.SECP384R1())
    # created 0600 and renamed into place: never readable by others, not even before a chmod
    write_private(key.private, private.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()))
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
    write_public(key.public, public + f" {name}\n".encode())
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.deploy.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the key files")
    parser.add_argument("--name", action="append", default=[],
                        help="key name, one per SuperNode (repeatable)")
    parser.add_argument("--count", type=int, default=0,
                        help="alternatively: generate supernode-0 .. supernode-(N-1)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    names = args.name + [f"supernode-{i}" for i in range(args.count)]
    if not names:
        parser.error("give --name (repeatable) or --count")
    try:
        for name in names:
            k = generate(args.out, name, overwrite=args.force)
            print(f"{k.name}: private {k.private} (keep on the node), public {k.public} (register)")
    except FileExistsError as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
