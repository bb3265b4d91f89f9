"""Client partitions as index lists into the train split, built with flwr-datasets.

The partitioner sees the train split plus an ``__index__`` column; a client's partition is
just the list of row indices it owns, computed lazily (only clients that are sampled ever
materialise their list) and cached, so 100k clients cost O(examples), not O(clients) models.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedpeft.registry import Registry

INDEX_COLUMN = "__index__"

PartitionerFactory = Callable[..., Partitioner]
PARTITIONERS: Registry[PartitionerFactory] = Registry("partition scheme")


@PARTITIONERS.register("iid")
def _iid(num_partitions: int, label_column: str, dirichlet_alpha: float, seed: int,
         num_examples: int) -> Partitioner:
    return IidPartitioner(num_partitions=num_partitions)


@PARTITIONERS.register("dirichlet")
def _dirichlet(num_partitions: int, label_column: str, dirichlet_alpha: float, seed: int,
               num_examples: int) -> Partitioner:
    # flwr-datasets re-draws (at most 10 times, then fails) until every partition has
    # min_partition_size examples; at small alpha or many clients that is infeasible, so we
    # accept the plain Dirichlet draw: small or even empty clients (they train on nothing
    # and carry zero aggregation weight).
    return DirichletPartitioner(num_partitions=num_partitions, partition_by=label_column,
                                alpha=dirichlet_alpha, min_partition_size=0,
                                self_balancing=False, shuffle=True, seed=seed)


class Partitions:
    """Lazy ``client id -> train row indices`` for one partition scheme."""

    def __init__(self, train: Dataset, scheme: str, num_partitions: int, label_column: str,
                 dirichlet_alpha: float, seed: int) -> None:
        factory = PARTITIONERS.get(scheme)
        self.num_partitions = num_partitions
        self._partitioner = factory(num_partitions, label_column, dirichlet_alpha, seed, len(train))
        # only the index and label columns: partitioners never need the text
        keep = [label_column]
        slim = train.select_columns(keep).add_column(INDEX_COLUMN, np.arange(len(train)))
        self._partitioner.dataset = slim
        self.indices = lru_cache(maxsize=4096)(self._indices)

    def _indices(self, partition_id: int) -> np.ndarray:
        if not 0 <= partition_id < self.num_partitions:
            raise IndexError(f"partition {partition_id} outside 0..{self.num_partitions - 1}")
        part = self._partitioner.load_partition(partition_id)
        return np.asarray(part[INDEX_COLUMN], dtype=np.int64)
