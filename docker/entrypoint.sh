#!/bin/sh
# Container entry: one federation role per container (python -m fedpeft.deploy --help).
set -eu
if [ "$(id -u)" = "0" ]; then
  echo "fedpeft-entrypoint: refusing to run as root; use the image's fedpeft user" >&2
  exit 1
fi
exec python -m fedpeft.deploy "$@"
