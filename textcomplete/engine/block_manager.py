"""The KV cache block allocator: pure Python over block ids.

It hands fixed-size blocks to requests and takes them back; the tensors those ids index are owned
by the model runner. Invariant: every block is either free or held by exactly the requests that
counted it in `ref_counts`.
"""

from __future__ import annotations

from collections import deque

from textcomplete.engine.request import Request


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache has no blocks: raise the KV cache memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Blocks the request must gain so that its first `num_tokens` tokens have slots."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(request.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow the request's block table to cover `num_tokens` tokens; False (and no change) if full."""
        need = self.blocks_needed(request, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.popleft()
            self.ref_counts[block] = 1
            request.block_table.append(block)
        return True

    def free(self, request: Request) -> None:
        """Return every block the request holds; its cache contents are gone."""
        # Reversed so that the tail blocks, least likely to be shared later, are reused first.
        for block in reversed(request.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
        request.block_table = []
        request.num_computed_tokens = 0
