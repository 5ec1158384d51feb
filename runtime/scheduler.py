"""Scheduling: the request queue, block accounting, admission, chunked prefill and preemption.

Pure Python (no tensors, no model), so every policy is testable on its own. The engine asks
`Scheduler.schedule()` what to run each step and reports back with `commit` / `finish`.

A `Sequence` holds all its known tokens (prompt + generated). Its K/V for `token_ids[:num_cached]`
are in the pool, in `block_ids` (token t in block_ids[t // block_size], row t % block_size). Each step a
sequence feeds `token_ids[num_cached:]`: exactly one token is a decode; more is (a chunk of) a prefill.
After a forward pass the last token's logits give the next token, so a sequence whose uncached tokens
were all fed samples one token.

Policy (vLLM/LMDeploy-style, first come first served):
  1. running sequences are served oldest first; a decode that needs a new block takes a free one,
     else a parked session is evicted, else the newest running sequence is preempted by recompute
     (its blocks freed, `num_cached` reset, put back at the head of the waiting queue);
  2. prefills in progress continue, then waiting requests are admitted in arrival order while the
     free blocks cover all of their uncached tokens (plus a small watermark kept for running decodes)
     and the per-step prefill budget `max_prefill_tokens` lasts (none in a step that had to preempt); a
     long prompt is fed in chunks over several steps. The head of the queue is never skipped.
  3. finished requests free their blocks at once. A *session* (chat) instead parks its sequence with its
     blocks so the next turn sends only new tokens; parked blocks are the first to be reclaimed.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any


class RequestError(ValueError):
    """A request that can never run (too long for session_len or for the whole pool); says the numbers."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"  # a session between turns: keeps its blocks, may be evicted
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: Any  # SamplingParams; the scheduler reads only max_tokens
    is_session: bool = False
    block_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    status: Status = Status.WAITING
    arrival: int = 0
    finish_reason: str | None = None
    state: Any = None  # the engine's per-request data (sampling generator, ...)

    @property
    def num_uncached(self) -> int:
        return len(self.token_ids) - self.num_cached

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class BlockAllocator:
    """A free list of `num_blocks` block ids. Freed blocks go to the front: recently used memory is warm."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free)} free")  # callers check first
        ids = [self.free.popleft() for _ in range(n)]
        self.used.update(ids)
        return ids

    def release(self, ids: list[int]) -> None:
        for i in reversed(ids):
            if i not in self.used:
                raise RuntimeError(f"block {i} freed twice")
            self.used.remove(i)
            self.free.appendleft(i)


@dataclass
class Chunk:
    """Feed seq.token_ids[start : start + length] this step; `samples`: the chunk ends the uncached tokens."""

    seq: Sequence
    start: int
    length: int
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.length == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    prefills: list[Chunk] = field(default_factory=list)  # one padded forward pass
    decodes: list[Chunk] = field(default_factory=list)  # one token each, one forward pass
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes)


def peak_blocks(num_tokens: int, block_size: int, open_block_helper: bool) -> int:
    """The most blocks a sequence holds on its way to num_tokens cached tokens: its blocks, plus (open_block_helper)
    the helper block it holds while its last block is partly filled."""
    return -(-num_tokens // block_size) + open_block_helper


class Scheduler:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_running: int = 256,
        max_prefill_tokens: int = 4096,
        session_len: int = 2048,
        open_block_helper: bool = False,
    ) -> None:
        """open_block_helper: a sequence whose last block is partly filled also holds the block after it (the
        per-channel-key cache keeps an open block's key rows in two blocks' space; `runtime.kv_cache`)."""
        if min(num_blocks, block_size, max_running, max_prefill_tokens, session_len) <= 0:
            raise ValueError("num_blocks, block_size, max_running, max_prefill_tokens and session_len must be > 0")
        self.block_size = block_size
        self.open_block_helper = open_block_helper
        self.allocator = BlockAllocator(num_blocks)
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.session_len = session_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order: the last one is the newest
        self.parked: dict[str, Sequence] = {}  # insertion order = least recently used first
        self.requests: dict[str, Sequence] = {}  # every unfinished request (waiting | running | parked)
        self.watermark = max(1, num_blocks // 100)
        self.num_preemptions = 0
        self._arrivals = itertools.count()

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of num_tokens cached tokens holds (with open_block_helper: +1 while its last block
        is partly filled)."""
        helper = self.open_block_helper and num_tokens % self.block_size != 0
        return -(-num_tokens // self.block_size) + helper

    def check_fits(self, num_tokens: int, max_tokens: int, what: str = "prompt") -> None:
        """Raise RequestError unless num_tokens + max_tokens fit both session_len and the whole pool."""
        total = num_tokens + max_tokens
        if total > self.session_len:
            raise RequestError(
                f"{what} of {num_tokens} tokens + max_tokens {max_tokens} = {total} > session_len "
                f"{self.session_len}; shorten the prompt, lower max_tokens or raise session_len"
            )
        peak = peak_blocks(total, self.block_size, self.open_block_helper)
        if peak > self.num_blocks:
            helper = " + 1 helper block for the open block" if self.open_block_helper else ""
            raise RequestError(
                f"{what} of {num_tokens} tokens + max_tokens {max_tokens} = {total} > the KV pool's "
                f"{self.capacity_tokens} tokens ({self.num_blocks} blocks x {self.block_size}{helper}); "
                "raise kv_cache_gib / cache_max_entry_count or lower max_tokens"
            )

    # -- lifecycle --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request, or the next turn of a parked session (seq.token_ids already extended)."""
        if seq.request_id in self.requests and seq.status != Status.PARKED:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.check_fits(seq.num_prompt_tokens, seq.params.max_tokens, "prompt" if not seq.is_session else "session")
        self.parked.pop(seq.request_id, None)
        seq.status, seq.finish_reason, seq.arrival = Status.WAITING, None, next(self._arrivals)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request: its blocks are freed, or (a session) kept while it is parked."""
        self._detach(seq)
        seq.finish_reason = reason
        if seq.is_session:
            seq.status = Status.PARKED
            self.parked[seq.request_id] = seq
        else:
            self._free(seq)
            seq.status = Status.FINISHED
            self.requests.pop(seq.request_id, None)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a request (or a session) and free its blocks at once; None when unknown or finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self._detach(seq)
        self.parked.pop(request_id, None)
        self._free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _detach(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _free(self, seq: Sequence) -> None:
        self.allocator.release(seq.block_ids)
        seq.block_ids, seq.num_cached = [], 0

    # -- one step ---------------------------------------------------------------------------------
    def evict_parked(self, needed: int) -> bool:
        """Free parked sessions' blocks (least recently used first) until `needed` blocks are free."""
        while self.allocator.num_free < needed and self.parked:
            seq = self.parked.pop(next(iter(self.parked)))
            self._free(seq)  # it stays a session: its next turn recomputes the history
        return self.allocator.num_free >= needed

    def make_room(self, needed: int, keep: Sequence | None = None) -> bool:
        """Free blocks until `needed` are free without touching running sequences: parked sessions' first, then the
        cached histories that queued session turns hold (the newest turn first; it recomputes its history when
        admitted). Without the second, a queued turn's blocks could keep the head of the queue from ever fitting
        while the turn waits behind it: no step would run again. `keep`: the sequence the room is for."""
        if self.evict_parked(needed):
            return True
        for seq in reversed(self.waiting):
            if self.allocator.num_free >= needed:
                break
            if seq is not keep and seq.block_ids:
                self._free(seq)
        return self.allocator.num_free >= needed

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.decodes = [c for c in out.decodes if c.seq is not seq]
        out.prefills = [c for c in out.prefills if c.seq is not seq]
        self.num_preemptions += 1

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make seq's blocks cover its first num_tokens tokens (the caller checked they are free)."""
        extra = self.blocks_for(num_tokens) - len(seq.block_ids)
        if extra > 0:
            seq.block_ids.extend(self.allocator.allocate(extra))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_prefill_tokens
        # 1. running sequences, oldest first: decodes, then prefills in progress
        for seq in list(self.running):
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = seq.num_uncached if seq.num_uncached == 1 else min(seq.num_uncached, budget)
            if n == 0:
                continue
            need = self.blocks_for(seq.num_cached + n) - len(seq.block_ids)
            while not self.make_room(need, keep=seq):  # preempt the newest running sequences, maybe seq itself
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self._grow(seq, seq.num_cached + n)
            chunk = Chunk(seq, seq.num_cached, n)
            if n == 1 and seq.num_uncached == 1:
                out.decodes.append(chunk)
            else:
                out.prefills.append(chunk)
                budget -= n
        # 2. admissions, first come first served, while blocks and the prefill budget last; none in a step that
        #    had to preempt (the pool is short: re-admitting the victim now would only thrash)
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            total_blocks = self.blocks_for(len(seq.token_ids))
            need = total_blocks - len(seq.block_ids)
            reserve = self.watermark if self.running else 0  # room for the running decodes' next blocks
            if not self.make_room(need + reserve, keep=seq):
                break
            self.waiting.popleft()
            self._grow(seq, len(seq.token_ids))
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncached, budget)
            (out.decodes if seq.num_uncached == 1 else out.prefills).append(Chunk(seq, seq.num_cached, n))
            budget -= n
        return out

    def commit(self, chunk: Chunk) -> None:
        """The chunk's K/V are in the pool (called after the forward pass succeeded)."""
        chunk.seq.num_cached = chunk.start + chunk.length

    # -- accounting checks ------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every block is owned by exactly one live sequence or free (used by the tests)."""
        owned = [b for s in self.requests.values() for b in s.block_ids]
        assert len(owned) == len(set(owned)), "a block has two owners"
        assert set(owned) == self.allocator.used, "block ownership and the allocator disagree"
        assert len(owned) + self.allocator.num_free == self.num_blocks
        for s in self.requests.values():
            assert len(s.block_ids) >= self.blocks_for(s.num_cached), f"{s.request_id}: cached tokens without blocks"
