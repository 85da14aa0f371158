"""The KV cache block allocator, with prefix caching: pure Python over block ids.

It hands fixed-size blocks to requests and takes them back; the tensors those ids index are owned by
the model runner. A full block is identified by a hash chained over every token id up to its end, so
a later request whose prompt starts with the same tokens reuses the block instead of recomputing it.
Blocks nobody holds but whose contents are cached stay reusable until memory is needed; then the least
recently used is evicted.

Invariants: a block is exactly one of held (ref_count > 0), cached-idle (in `_idle`, ref_count 0, hashed)
or free (in `_free`, ref_count 0, unhashed); `_by_hash[h] == b` iff `_block_hash[b] == h`.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from textcomplete.engine.request import Request

# The parent of a prompt's first block. A fixed integer, not None: hash(None) differs between
# processes, and a router in another process must compute the very hashes this cache keys blocks by.
_ROOT = 0


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The hash of a full block: chained over the block's tokens and the hash of the block before it.

    It depends only on token ids (Python's tuple hash over ints, the same in every process of one
    Python version), so the cluster router keys requests by exactly what this cache stores.
    """
    return hash((_ROOT if parent is None else parent, tokens))


def prefix_block_hashes(token_ids: list[int] | tuple[int, ...], block_size: int) -> list[int]:
    """The chained hashes of every full block of `token_ids`, in order."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, tuple(token_ids[start:start + block_size]))
        hashes.append(parent)
    return hashes


def reusable_prefix_hashes(token_ids: list[int] | tuple[int, ...], block_size: int) -> list[int]:
    """The hashes of the blocks a new request with this prompt could take from the cache: every full block
    but the one holding the last token, which is always computed (see `reuse_cached_prefix`)."""
    return prefix_block_hashes(token_ids[:len(token_ids) - 1], block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks: raise the KV cache memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._idle: OrderedDict[int, None] = OrderedDict()       # cached, unheld; oldest use first
        self._block_hash: list[int | None] = [None] * num_blocks
        # A block's own tokens, compared on a hit: a hash collision cannot serve the wrong block's K/V.
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to allocate: never used, or cached but held by no request."""
        return len(self._free) + len(self._idle)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Blocks the request must gain so that its first `num_tokens` tokens have slots."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(request.block_table))

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow the request's block table to cover `num_tokens` tokens; False (and no change) if full."""
        need = self.blocks_needed(request, num_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            block = self._take_block()
            self.ref_counts[block] = 1
            request.block_table.append(block)
        return True

    def _take_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._idle.popitem(last=False)   # least recently used cached block
        del self._by_hash[self._block_hash[block]]
        self._block_hash[block] = self._block_tokens[block] = None
        self.num_evictions += 1
        return block

    def free(self, request: Request) -> None:
        """Return every block the request holds; cached ones stay reusable until evicted."""
        # Reversed so that a sequence's tail is evicted before its head, which more requests share.
        for block in reversed(request.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self._block_hash[block] is not None:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        request.block_table = []
        request.block_hashes = []
        request.num_computed_tokens = 0

    def reuse_cached_prefix(self, request: Request) -> int:
        """Give a request with nothing computed the cached blocks of its longest cached prefix.

        At least one token is always left to compute, because sampling needs its logits; requests that
        want prompt log-probabilities get no hits, since those need every position's logits.
        Returns the number of tokens served from the cache.
        """
        if not self.enable_prefix_caching or request.num_computed_tokens or request.block_table:
            return 0
        if request.params.prompt_logprobs is not None:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        parent = None
        for i in range(max_blocks):
            tokens = tuple(request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block = self._by_hash.get(h)
            if block is None or self._block_tokens[block] != tokens:
                break
            if self.ref_counts[block] == 0:
                del self._idle[block]
            self.ref_counts[block] += 1
            request.block_table.append(block)
            request.block_hashes.append(h)
            parent = h
        request.num_computed_tokens = len(request.block_table) * self.block_size
        return request.num_computed_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks (every slot computed) for reuse."""
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        for i in range(len(request.block_hashes), full):
            parent = request.block_hashes[-1] if request.block_hashes else None
            tokens = tuple(request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            request.block_hashes.append(h)
            block = request.block_table[i]
            if h not in self._by_hash and self._block_hash[block] is None:
                self._by_hash[h] = block
                self._block_hash[block] = h
                self._block_tokens[block] = tokens
