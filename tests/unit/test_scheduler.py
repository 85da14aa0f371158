"""The scheduler and block allocator on their own: pure Python, no model."""

from __future__ import annotations

from textcomplete.engine.block_manager import BlockAllocator
from textcomplete.engine.request import Request, RequestStatus
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.engine.scheduler import Scheduler


def make(n_blocks=10, block_size=4, budget=16, max_seqs=8):
    alloc = BlockAllocator(n_blocks, block_size)
    return alloc, Scheduler(alloc, budget, max_seqs)


def request(i: int, prompt_len: int) -> Request:
    return Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8), arrival=i)


def finish_step(sched_out) -> None:
    """What the engine does after a step: count computed tokens, append a token where one was sampled."""
    for c in sched_out.chunks:
        complete = c.completes_sequence
        c.request.num_computed_tokens = c.end
        if complete:
            c.request.token_ids.append(7)


def test_long_prompt_is_chunked_under_the_token_budget():
    alloc, sched = make(budget=16)
    r = request(0, 40)
    sched.add(r)
    sizes = []
    while r.num_output_tokens == 0:
        out = sched.schedule()
        sizes.append(out.num_tokens)
        finish_step(out)
    assert sizes == [16, 16, 8]
    assert len(r.block_table) == 10   # the 40 computed tokens; the sampled one gets its slot next step


def test_running_decodes_go_before_a_new_prefill():
    alloc, sched = make(n_blocks=40, budget=16)
    a = request(0, 4)
    sched.add(a)
    finish_step(sched.schedule())          # a's prompt, first token sampled
    b = request(1, 40)
    sched.add(b)
    out = sched.schedule()
    assert out.chunks[0].request is a and out.chunks[0].num_tokens == 1
    assert out.chunks[1].request is b and out.chunks[1].num_tokens == 15


def test_out_of_blocks_preempts_the_newest_and_frees_its_blocks():
    alloc, sched = make(n_blocks=4, block_size=4, budget=64)
    a, b = request(0, 8), request(1, 8)
    sched.add(a)
    sched.add(b)
    finish_step(sched.schedule())          # both prompts: 4 blocks, all used; each has 9 tokens now
    out = sched.schedule()                 # a needs a 3rd block: b is preempted
    assert out.preempted == [b] and b.status is RequestStatus.WAITING
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert [c.request for c in out.chunks] == [a]
    assert alloc.num_free_blocks == 1


def test_max_num_seqs_caps_admission():
    alloc, sched = make(n_blocks=100, budget=1000, max_seqs=3)
    for i in range(5):
        sched.add(request(i, 4))
    out = sched.schedule()
    assert len(out.chunks) == 3 and len(sched.waiting) == 2


def test_remove_returns_blocks_and_clears_state():
    alloc, sched = make()
    r = request(0, 10)
    sched.add(r)
    finish_step(sched.schedule())
    assert alloc.num_used_blocks == 3
    sched.remove(r)
    assert alloc.num_free_blocks == alloc.num_blocks and r.status is RequestStatus.FINISHED
    assert not sched.has_work()
