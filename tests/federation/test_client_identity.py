"""A client's random stream follows its identity (node partition-id), not its data partition:
nodes that bring their own dataset are all partition 0 of 1 but must not share shuffles."""

from __future__ import annotations

import numpy as np

from fedpeft.config import RunConfig
from fedpeft.engine.client import ClientRound, client_seed


def test_dataset_path_nodes_get_distinct_streams():
    cfg = RunConfig(seed=3)
    a = ClientRound(client_id=0, num_partitions=1, server_round=2, round_rank=None, state_key="4")
    b = ClientRound(client_id=0, num_partitions=1, server_round=2, round_rank=None, state_key="9")
    assert (a.identity, b.identity) == (4, 9)
    assert client_seed(cfg, a) == [3, 2, 4] and client_seed(cfg, b) == [3, 2, 9]
    draws = [np.random.default_rng(client_seed(cfg, r)).integers(2**31) for r in (a, b)]
    assert draws[0] != draws[1]


def test_simulated_clients_keep_their_partition_index_as_identity():
    r = ClientRound(client_id=7, num_partitions=100, server_round=1, round_rank=None)
    assert r.key == "7" and r.identity == 7
    assert ClientRound(client_id=7, num_partitions=100, server_round=1, round_rank=None,
                       state_key="node-a").identity == 7  # non-numeric keys fall back
