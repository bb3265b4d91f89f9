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

from fedpeft.data.lazy_plots import defer_flwr_datasets_plots

defer_flwr_datasets_plots()
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner  # noqa: E402

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


def iid_size(num_rows: int, num_partitions: int, partition_id: int) -> int:
    """Rows of IID partition ``partition_id``: flwr-datasets' IidPartitioner takes contiguous
    shards of ``num_rows // n`` rows, the first ``num_rows % n`` shards one row more."""
    div, mod = divmod(num_rows, num_partitions)
    return div + (1 if partition_id < mod else 0)


class Partitions:
    """Lazy ``client id -> train row indices`` for one partition scheme."""

    def __init__(self, train: Dataset, scheme: str, num_partitions: int, label_column: str,
                 dirichlet_alpha: float, seed: int, rows: np.ndarray | None = None) -> None:
        """``rows``: the train rows the partitions are drawn from (the others are held out,
        e.g. for validation, :mod:`fedpeft.data.holdout`); None = every row. Partitions always
        hold indices into ``train``."""
        factory = PARTITIONERS.get(scheme)
        self.num_partitions = num_partitions
        # only the index and label columns: partitioners never need the text
        keep = [label_column]
        slim = train.select_columns(keep).add_column(INDEX_COLUMN, np.arange(len(train)))
        if rows is not None:
            slim = slim.select(np.asarray(rows, dtype=np.int64))
        self._num_rows = len(slim)
        self._partitioner = factory(num_partitions, label_column, dirichlet_alpha, seed, len(slim))
        self._partitioner.dataset = slim
        self.indices = lru_cache(maxsize=4096)(self._indices)

    def sizes(self) -> np.ndarray:
        """Rows of every partition (IID: closed form; other schemes partition once)."""
        if isinstance(self._partitioner, IidPartitioner):
            return np.array([iid_size(self._num_rows, self.num_partitions, i)
                             for i in range(self.num_partitions)], dtype=np.int64)
        return np.array([len(self._indices(i)) for i in range(self.num_partitions)], dtype=np.int64)

    def _indices(self, partition_id: int) -> np.ndarray:
        if not 0 <= partition_id < self.num_partitions:
            raise IndexError(f"partition {partition_id} outside 0..{self.num_partitions - 1}")
        if isinstance(self._partitioner, IidPartitioner) and iid_size(
                self._num_rows, self.num_partitions, partition_id) == 0:
            # more clients than rows: datasets' contiguous shard fails on an empty tail shard
            return np.zeros(0, dtype=np.int64)
        part = self._partitioner.load_partition(partition_id)
        return np.asarray(part[INDEX_COLUMN], dtype=np.int64)


class FfaSkewPartitioner(Partitioner):
    """The 3-client label skew of the FFA-LoRA paper's non-IID runs (SPEC §1.2, §4).

    Binary labels only: client 0 gets label proportions [0.1, 0.9], client 1 [0.9, 0.1],
    client 2 [0.5, 0.5]. All three clients get the same number of examples ``m``, the largest
    that both label pools can serve (1.5·m examples of each label are needed); the clients are
    disjoint, rows beyond that are left unused. Row choice is a seeded shuffle of each label pool.
    """

    PROPORTIONS = ((0.1, 0.9), (0.9, 0.1), (0.5, 0.5))

    def __init__(self, num_partitions: int, partition_by: str, seed: int) -> None:
        super().__init__()
        from fedpeft.errors import UsageError

        if num_partitions != len(self.PROPORTIONS):
            raise UsageError(f"--partition ffa-skew is the 3-client skew [0.1,0.9]/[0.9,0.1]/[0.5,0.5]; "
                             f"--clients {num_partitions} is invalid; allowed: 3")
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._seed = seed
        self._rows: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _build(self) -> list[np.ndarray]:
        from fedpeft.errors import UsageError

        labels = np.asarray(self.dataset[self._partition_by])
        values = np.unique(labels)
        if len(values) != 2:
            raise UsageError(f"--partition ffa-skew needs a dataset with exactly 2 labels; this one has "
                             f"{len(values)}; allowed: a binary dataset such as rotten-tomatoes")
        rng = np.random.default_rng(self._seed)
        pools = [rng.permutation(np.flatnonzero(labels == v)) for v in values]
        need = [sum(p[k] for p in self.PROPORTIONS) for k in range(2)]  # 1.5, 1.5
        m = int(min(len(pools[k]) / need[k] for k in range(2)))
        rows, used = [], [0, 0]
        for props in self.PROPORTIONS:
            n0 = int(round(props[0] * m))
            counts = (n0, m - n0)
            part = []
            for k in range(2):
                part.append(pools[k][used[k]:used[k] + counts[k]])
                used[k] += counts[k]
            rows.append(rng.permutation(np.concatenate(part)))
        return rows

    def load_partition(self, partition_id: int) -> Dataset:
        if self._rows is None:
            self._rows = self._build()
        return self.dataset.select(self._rows[partition_id].tolist())


@PARTITIONERS.register("ffa-skew")
def _ffa_skew(num_partitions: int, label_column: str, dirichlet_alpha: float, seed: int,
              num_examples: int) -> Partitioner:
    return FfaSkewPartitioner(num_partitions=num_partitions, partition_by=label_column, seed=seed)
