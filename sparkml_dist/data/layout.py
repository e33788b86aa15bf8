"""Which data shards each rank reads. Pure: no Spark, no I/O.

Preparation deals rows to ``num_shards`` shards (row ``g`` goes to shard ``g % num_shards``) and
lays the prepared frame out as one partition per rank, partition ``r`` holding exactly the shards
of rank ``r``. Data-parallel training reads one shard per rank (:meth:`DataLayout.one_per_rank`);
other strategies (federated clients, parameter servers that hold no data, ...) map shards to ranks
differently through the same object.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataLayout:
    """Which shards each rank reads. Shard ids are 0..num_shards-1; every shard is read by
    exactly one rank; a rank may read none or several."""

    num_shards: int
    """How many shards rows are dealt to (``__row % num_shards``)."""
    shards_of_rank: tuple[tuple[int, ...], ...]
    """``shards_of_rank[r]``: the shards rank ``r`` reads, ascending; its length is the world
    size."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ValueError(f"DataLayout.num_shards must be an int >= 1; got {self.num_shards!r}.")
        ranks = tuple(tuple(s) for s in self.shards_of_rank)
        if not ranks:
            raise ValueError("DataLayout.shards_of_rank is empty; it needs one entry (a tuple of "
                             "shard ids, possibly empty) per rank.")
        seen: dict[int, int] = {}
        for rank, shards in enumerate(ranks):
            for s in shards:
                if not isinstance(s, int) or not 0 <= s < self.num_shards:
                    raise ValueError(f"DataLayout: rank {rank} lists shard {s!r}; shard ids must "
                                     f"be ints in 0..{self.num_shards - 1}.")
                if s in seen:
                    raise ValueError(f"DataLayout: shard {s} is listed by rank {seen[s]} and rank "
                                     f"{rank}; every shard is read by exactly one rank.")
                seen[s] = rank
            if list(shards) != sorted(shards):
                raise ValueError(f"DataLayout: rank {rank} lists shards {shards}; list them in "
                                 "ascending order.")
        missing = [s for s in range(self.num_shards) if s not in seen]
        if missing:
            raise ValueError(f"DataLayout: shards {missing[:10]} are read by no rank; every "
                             f"shard 0..{self.num_shards - 1} must belong to exactly one rank.")
        object.__setattr__(self, "shards_of_rank", ranks)
        object.__setattr__(self, "_rank_of", seen)

    @property
    def world_size(self) -> int:
        """Number of ranks (partitions of the prepared frame)."""
        return len(self.shards_of_rank)

    def rank_of_shard(self, shard: int) -> int:
        """The rank that reads ``shard``."""
        try:
            return self._rank_of[shard]  # type: ignore[attr-defined]
        except KeyError:
            raise ValueError(f"shard {shard!r} is not in this layout (shards are "
                             f"0..{self.num_shards - 1}).") from None

    @staticmethod
    def one_per_rank(world_size: int) -> DataLayout:
        """Shard ``r`` read by rank ``r``: data-parallel training's layout."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be an int >= 1; got {world_size!r}.")
        return DataLayout(world_size, tuple((r,) for r in range(world_size)))
