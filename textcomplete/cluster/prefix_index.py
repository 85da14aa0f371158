"""Where each prompt prefix was sent: block hash -> the replicas that were given it. Pure Python.

The router's memory of the replicas' prefix caches. It is a hint, never a correctness matter: a replica
whose cache has since evicted a block simply recomputes it.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PrefixIndex:
    """Chained block hashes -> replica ids, least recently used entries dropped past `max_blocks`."""

    def __init__(self, max_blocks: int = 1 << 18) -> None:
        self.max_blocks = max_blocks
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def record(self, block_hashes: Sequence[int], replica: str) -> None:
        """`replica` was sent a prompt starting with these blocks, so it will hold them in its cache."""
        for h in block_hashes:
            holders = self._holders.get(h)
            if holders is None:
                holders = self._holders[h] = set()
            else:
                self._holders.move_to_end(h)
            holders.add(replica)
        while len(self._holders) > self.max_blocks:
            self._holders.popitem(last=False)

    def longest_match(self, block_hashes: Sequence[int], replicas: Iterable[str]) -> tuple[set[str], int]:
        """Among `replicas`, those holding the longest prefix of these blocks, and its length in blocks.

        Hashes chain, so a replica holds blocks 0..k iff it holds block k's hash and all before it; the
        walk stops at the first block nobody left in the running holds.
        """
        best, matched = set(replicas), 0
        for h in block_hashes:
            holding = best & self._holders.get(h, set())
            if not holding:
                break
            best, matched = holding, matched + 1
        return (best if matched else set()), matched

    def forget(self, replica: str) -> None:
        """Drop a replica (it died or was scaled away: its cache is gone with it)."""
        empty = []
        for h, holders in self._holders.items():
            holders.discard(replica)
            if not holders:
                empty.append(h)
        for h in empty:
            del self._holders[h]


def choose(block_hashes: Sequence[int], index: PrefixIndex, queue_lens: dict[str, int],
           imbalance_threshold: int, rng: random.Random | None = None) -> list[list[str]]:
    """Ranked tiers of replica ids for one request (Serve tries the first tier, then the next).

    The replicas holding the request's longest cached prefix come first, unless one of them has a queue
    more than `imbalance_threshold` requests longer than the shortest queue: then, as with no match at all,
    two random replicas (power of two choices; Serve takes the one with the shorter queue).
    """
    rng = rng or random
    replicas = sorted(queue_lens)
    if not replicas:
        return []
    holders, matched = index.longest_match(block_hashes, replicas)
    shortest = min(queue_lens.values())
    holders = {r for r in holders if queue_lens[r] - shortest <= imbalance_threshold}
    if holders:
        best = sorted(holders)
        return [best, [r for r in replicas if r not in holders]]
    return [rng.sample(replicas, min(2, len(replicas)))]
