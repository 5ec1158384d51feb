"""The scheduler without a model: admission, chunked prefill, preemption, sessions, and block accounting
under random add / step / finish / abort sequences (hypothesis)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.scheduler import RequestError, Scheduler, Sequence, Status


def seq(rid: str, n: int, max_tokens: int = 8, session: bool = False) -> Sequence:
    return Sequence(rid, list(range(n)), n, SimpleNamespace(max_tokens=max_tokens), is_session=session)


def run_step(sch: Scheduler, *, finish_after: dict | None = None) -> tuple:
    """Schedule, 'run' every chunk (commit + append a token where it samples), finish sequences that reached
    max_tokens. Returns the plan."""
    plan = sch.schedule()
    for c in plan.prefills + plan.decodes:
        sch.commit(c)
        if c.samples:
            c.seq.token_ids.append(0)
            if c.seq.num_output_tokens >= c.seq.params.max_tokens:
                sch.finish(c.seq, "length")
    sch.check_invariants()
    return plan


def test_admits_fcfs_while_blocks_cover_prompts():
    sch = Scheduler(num_blocks=10, block_size=4, max_prefill_tokens=1000)
    for i, n in enumerate([12, 20, 8]):  # 3, 5 and 2 blocks
        sch.add(seq(f"r{i}", n))
    plan = sch.schedule()
    # r0 (3 blocks) and r1 (5) fit; r2 (2) would fit but 1 block stays free for the running decodes
    assert [c.seq.request_id for c in plan.prefills] == ["r0", "r1"]
    assert [s.request_id for s in sch.waiting] == ["r2"]
    assert sch.allocator.num_free == 2


def test_long_prompt_is_prefilled_in_chunks_and_decodes_share_a_step():
    sch = Scheduler(num_blocks=20, block_size=4, max_prefill_tokens=8)
    sch.add(seq("short", 3))
    sch.add(seq("long", 21))
    p1 = run_step(sch)
    assert [(c.seq.request_id, c.start, c.length) for c in p1.prefills] == [("short", 0, 3), ("long", 0, 5)]
    p2 = run_step(sch)  # short decodes; long continues with a full budget
    assert [(c.seq.request_id, c.length) for c in p2.decodes] == [("short", 1)]
    assert [(c.seq.request_id, c.start, c.length) for c in p2.prefills] == [("long", 5, 8)]
    p3 = run_step(sch)
    assert [(c.seq.request_id, c.start, c.length, c.samples) for c in p3.prefills] == [("long", 13, 8, True)]


def test_decode_without_a_free_block_preempts_the_newest():
    sch = Scheduler(num_blocks=4, block_size=4, max_prefill_tokens=100)
    sch.watermark = 0
    a, b = seq("a", 8, max_tokens=8), seq("b", 8, max_tokens=8)
    sch.add(a)
    sch.add(b)
    run_step(sch)  # both prefilled: 4 blocks used, each sequence has 9 tokens (8 cached)
    plan = run_step(sch)  # both need a 3rd block for position 8: b (newest) is preempted for a
    assert plan.preempted == [b] and [c.seq for c in plan.decodes] == [a]
    assert b.status == Status.WAITING and b.num_cached == 0 and b.block_ids == [] and sch.waiting[0] is b
    assert sch.num_preemptions == 1 and len(b.token_ids) == 9  # the generated token is kept: recompute


def test_the_only_running_sequence_preempts_itself_when_nothing_else_frees_blocks():
    sch = Scheduler(num_blocks=2, block_size=4, max_prefill_tokens=100)
    s = seq("s", 4, max_tokens=3, session=True)
    sch.add(s)
    run_step(sch)
    sch.finish(s, "stop")  # parked with its block
    t = seq("t", 4, max_tokens=4)
    sch.add(t)
    run_step(sch)  # t admitted into the one free block
    run_step(sch)  # t needs a second block: the parked session is evicted, not t
    assert s.status == Status.PARKED and s.block_ids == [] and t.status == Status.RUNNING


def test_requests_that_can_never_fit_are_refused_with_the_numbers():
    sch = Scheduler(num_blocks=4, block_size=4, session_len=32)
    with pytest.raises(RequestError, match=r"30 tokens \+ max_tokens 8 = 38 > session_len 32"):
        sch.add(seq("x", 30))
    with pytest.raises(RequestError, match=r"16 tokens \(4 blocks x 4\)"):
        sch.add(seq("y", 12, max_tokens=8))
    assert not sch.has_unfinished() and sch.allocator.num_free == 4


def test_abort_frees_blocks_at_once():
    sch = Scheduler(num_blocks=8, block_size=4)
    sch.add(seq("a", 10))
    sch.add(seq("b", 10))
    run_step(sch)
    assert sch.abort("a") is not None and sch.abort("a") is None
    assert sch.allocator.num_free == 8 - 3
    sch.abort("b")
    assert sch.allocator.num_free == 8 and not sch.has_unfinished()


def test_a_queued_turns_history_never_keeps_the_head_of_the_queue_out():
    """Found by the property test below: a session's next turn queued behind a request that needs the whole pool
    held its history's block; the request, preempted when its decode outgrew the rest, could then never be
    admitted again and the turn waited behind it: no step ever ran. The turn's history is dropped instead (it
    recomputes it) and both complete."""
    sch = Scheduler(10, 3, max_running=6, max_prefill_tokens=1, session_len=64)
    turn = seq("session", 1, 1, session=True)
    sch.add(turn)
    run_step(sch)
    assert turn.status == Status.PARKED and turn.block_ids
    sch.add(big := seq("big", 25, 4))  # 29 tokens: all 10 blocks of 3
    turn.token_ids.append(7)
    turn.num_prompt_tokens = len(turn.token_ids)
    sch.add(turn)
    for _ in range(100):
        if not sch.has_unfinished():
            break
        run_step(sch)
    assert big.status == Status.FINISHED and turn.status == Status.PARKED
    assert turn.num_cached == len(turn.token_ids) - 1  # its history recomputed, its answer cached but the last


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.booleans()),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("turn"), st.integers(0, 30), st.integers(1, 6)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 3, 4, 16]), budget=st.integers(1, 64))
def test_every_block_is_free_again_after_any_sequence_of_operations(ops, num_blocks, block_size, budget):
    sch = Scheduler(num_blocks, block_size, max_running=6, max_prefill_tokens=budget, session_len=64)
    made: list[Sequence] = []
    for op in ops:
        if op[0] == "add":
            s = seq(f"r{len(made)}", op[1], op[2], session=op[3])
            try:
                sch.add(s)
            except RequestError:
                continue
            made.append(s)
        elif op[0] == "step":
            run_step(sch)
        elif op[0] == "abort" and made:
            sch.abort(made[op[1] % len(made)].request_id)
        elif op[0] == "turn" and made:  # a parked session's next turn
            s = made[op[1] % len(made)]
            if s.status == Status.PARKED and len(s.token_ids) + op[2] + s.params.max_tokens <= 64:
                s.token_ids.extend(range(op[2]))
                s.num_prompt_tokens = len(s.token_ids)
                try:
                    sch.add(s)
                except RequestError:
                    pass
        sch.check_invariants()
    for _ in range(10_000):  # everything still queued completes: no livelock, no lost request
        if not sch.has_unfinished():
            break
        run_step(sch)
    assert not sch.has_unfinished()
    for s in made:
        sch.abort(s.request_id)  # sessions too
    sch.check_invariants()
    assert sch.allocator.num_free == num_blocks and not sch.requests
