"""A two-node Ray cluster on one machine: ``--ray-address`` spreads clients over both nodes.

Everything runs inside a network namespace this test creates (``unshare --net``, only the
loopback interface) and a PID namespace (every Ray daemon dies with it), so Ray can bind and
advertise nothing but 127.0.0.1 and nothing outlives the test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
set -euo pipefail
ip link set lo up
export RAY_USAGE_STATS_ENABLED=0 FLWR_TELEMETRY_ENABLED=0 FEDPEFT_CACHE_DIR="{cache}"
BIN="{bin}"
T=$(mktemp -d /tmp/fp-ray.XXXX)
"$BIN/ray" start --head --node-ip-address 127.0.0.1 --port 6391 --num-cpus 1 --resources '{{"head_node": 1}}' \
    --include-dashboard false --temp-dir "$T" --disable-usage-stats >/dev/null
"$BIN/ray" start --address 127.0.0.1:6391 --node-ip-address 127.0.0.1 --num-cpus 1 \
    --resources '{{"second_node": 1}}' >/dev/null
"$BIN/python" - <<'PY'
import ray
ray.init(address="127.0.0.1:6391", logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]
assert len(nodes) == 2 and {{n["NodeManagerAddress"] for n in nodes}} == {{"127.0.0.1"}}, nodes
ray.shutdown()
PY
"$BIN/fedpeft" simulate --ray-address 127.0.0.1:6391 --clients 40 --cohort 12 --rounds 2 --adapter head \
    --max-test-examples 200 --output "{out}" >/dev/null
ss -Hltn | awk '{{print $4}}' > "{out}/listening.txt"
"""


def test_clients_run_on_both_nodes_of_a_two_node_cluster(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rn", "--pid", "--fork", "true"], capture_output=True).returncode != 0:
        pytest.fail("this test needs unprivileged user+network+pid namespaces (unshare -rn --pid)")
    out = tmp_path / "run"
    script = SCRIPT.format(bin=Path(sys.executable).parent, out=out, cache=tmp_path / "cache")
    proc = subprocess.run(["unshare", "-rn", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert len(rounds) == 2
    # 12 expected clients per round on 2 single-CPU nodes: the pool has one actor on each
    assert max(r["worker_nodes"] or 0 for r in rounds) == 2
    # nothing listened on anything but loopback (the namespace has no other address)
    listening = (out / "listening.txt").read_text().split()
    assert listening and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")) for a in listening)
