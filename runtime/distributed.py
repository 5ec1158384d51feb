"""Tensor parallelism on torch.distributed: one process per TP rank of a `tensor_para_size = N` workspace.

Every rank builds the same `Engine` on its own files: its QKV / wo / w1 / w3 / w2 slices and 1/N of the
vocabulary rows of tok_embeddings and output (`workspace.read_rank`), its H_kv / N KV heads in the pool and
its own KV parameter files (`kv_params.read(..., rank=r)`). Rank 0 is the normal engine (scheduler,
sampling, tokenizer, I/O); before each forward pass it broadcasts the `Step` (tokens, block tables, starts,
counts, slot mapping); ranks 1..N-1 only run `run_worker`: receive a step, run the same forward, repeat.
The block ids are rank 0's: every rank's pool has the same number of blocks (the smallest any rank's
budget allows, agreed at start-up), so the same ids address the same tokens on every rank.

Inside the forward (`runtime.model`): one all-reduce after the embedding lookup (each rank holds 1/N of
the rows), one after `wo` and one after `w2` per layer; the logits of each rank's vocabulary slice are
gathered on rank 0 only.

Launch:
    torchrun --nproc-per-node N -m runtime.chat WS     torchrun sets RANK / WORLD_SIZE / MASTER_*; the
                                                       entry point's main starts with
                                                       `if distributed.is_worker(): return distributed.run_worker(...)`
    LLM(WS, tensor_parallel_size=N)                    this process is rank 0; `launch` starts N-1
                                                       `python -m runtime.distributed` workers
Without either, a tensor_para_size = N workspace runs in one process with the ranks joined (`read_joined`).

Channels: the default process group (the all-reduces and the logits gather: gloo on the CPU, NCCL on a
GPU; a gloo group for the start-up agreements when the default is NCCL) has a timeout of KVQ_TP_TIMEOUT_S
(default 300) seconds, so a rank that stops answering raises instead of hanging. The steps travel through
a TCPStore hosted by rank 0 (one key per worker and step): rank 0's `set` never waits for a worker, and a
worker may wait there for as long as rank 0 is idle (a chat user typing) -- a gloo broadcast could do
neither, because its sender waits for every receiver, under the same timeout as the receivers. A hung
worker is then caught by the first all-reduce of the step. A rank that dies closes its sockets, which the
other ranks see at once. Every such failure becomes a `TPError` naming the operation, the rank and (for
launched workers) which worker exited how.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.model import Batch
from runtime.workspace import WorkspaceConfig

__all__ = ["Step", "TPError", "TPGroup", "is_worker", "run_worker", "setup"]

TIMEOUT_ENV = "KVQ_TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
# Workers wait for the next step as long as rank 0 is idle: no practical timeout there.
IDLE_TIMEOUT = timedelta(days=365)
LAUNCHED_ENV = "KVQ_TP_LAUNCHED"  # set by `launch` for its workers: join rank 0's store instead of env://


class TPError(RuntimeError):
    """A tensor-parallel rank died, timed out or was started wrongly; the message says which and what to do."""


@dataclass
class Step:
    """One forward pass, as rank 0 runs it (all tensors on the CPU)."""

    tokens: torch.Tensor  # (B, T) long, right-padded
    batch: Batch
    use_context_fmha: int
    all_logits: bool


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} = {value!r}: expected a number of seconds, e.g. 300") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} = {value!r}: must be > 0 seconds")
    return seconds


def is_worker() -> bool:
    """True in a torchrun process of rank > 0: it must run `run_worker` instead of the entry point's own work."""
    return "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", "0")) != 0


class TPGroup:
    """This process's place in the tensor-parallel group and the collectives the engine and model use."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        store: dist.Store,
        cpu_group,
        workers: list[subprocess.Popen],
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.store = store  # the steps, hosted by rank 0
        self.cpu_group = cpu_group  # gloo, for CPU tensors (None: the default group is gloo already)
        self.workers = workers  # rank 0 of `LLM(tensor_parallel_size=N)`: worker r is workers[r - 1]
        self.timeout = timeout_s()
        self.steps = 0  # steps sent (rank 0) or received (workers)
        self.failed: str | None = None  # why the group broke (a collective error, ...); unusable after it
        self.closed = False
        if rank == 0:
            atexit.register(self.close)  # stop the workers however rank 0's program ends

    # -- the model's collectives (data group) ------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> None:
        """Sum x over the ranks, in place (x: this rank's partial (B, T, hidden))."""
        with self._collective("all_reduce"):
            dist.all_reduce(x)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Each rank's (..., V_p / N) logits -> (..., V_p) on rank 0 (vocabulary order), None on the others."""
        parts = [torch.empty_like(logits) for _ in range(self.world_size)] if self.rank == 0 else None
        with self._collective("gather of the logits"):
            dist.gather(logits.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    # -- rank 0 -> workers (the store) --------------------------------------------------------------
    def broadcast_step(self, step: Step | None) -> None:
        """Rank 0: tell every worker what to run next (None: stop). Returns without waiting for them."""
        self.steps += 1
        payload = pickle.dumps(step)
        with self._collective("sending the step"):
            for r in range(1, self.world_size):
                self.store.set(f"kvq/step/{r}/{self.steps}", payload)

    def receive_step(self) -> Step | None:
        """A worker: wait (as long as rank 0 is idle) for the next step."""
        self.steps += 1
        key = f"kvq/step/{self.rank}/{self.steps}"
        with self._collective("waiting for the next step"):
            self.store.wait([key], IDLE_TIMEOUT)
            payload = self.store.get(key)
            self.store.delete_key(key)  # the store keeps only steps not yet taken
        return pickle.loads(payload)

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks (start-up: the pool's block count)."""
        t = torch.tensor([value], dtype=torch.long)
        with self._collective("agreement on the pool size"):
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t)

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (same length on all ranks), in rank order."""
        mine = torch.tensor(values, dtype=torch.long)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        with self._collective("exchange of the memory figures"):
            dist.all_gather(out, mine, group=self.cpu_group)
        return [t.tolist() for t in out]

    # -- failure and shutdown ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _collective(self, what: str):
        if self.failed is not None:
            raise TPError(f"tensor parallelism already failed ({self.failed}); restart all {self.world_size} ranks")
        if self.closed:
            raise TPError("this tensor-parallel engine was shut down; create a new one")
        try:
            yield
        except RuntimeError as e:  # gloo / NCCL / the store: a peer closed its connection, or the timeout passed
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            message = (
                f"tensor parallelism: {what} failed on rank {self.rank} of {self.world_size}: {reason}. "
                f"Another rank died or did not answer within {self.timeout:g} s ({TIMEOUT_ENV}); its own output "
                f"says why.{self._worker_report()} Restart all ranks."
            )
            self.abort(reason)
            raise TPError(message) from e

    def _worker_report(self) -> str:
        """How each launched worker is doing (rank 0 of LLM(tensor_parallel_size=N) only)."""
        lines = []
        for r, p in enumerate(self.workers, start=1):
            with contextlib.suppress(subprocess.TimeoutExpired):  # still running: reported below
                p.wait(timeout=1)
            if p.returncode is not None:
                lines.append(f"worker rank {r} (pid {p.pid}) exited with {_exit_text(p.returncode)}")
            else:
                lines.append(f"worker rank {r} (pid {p.pid}) is still running (stopped now)")
        return (" " + "; ".join(lines) + ".") if lines else ""

    def abort(self, reason: str) -> None:
        """After a failure: leave the group without telling the others (they see the closed connection or time
        out), stop launched workers; every later use raises TPError with `reason`."""
        if self.failed is None:
            self.failed = reason
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        _kill(self.workers)
        dist.destroy_process_group()
        _release(self)

    def close(self) -> None:
        """Rank 0: stop the workers (they leave their loop, then every rank leaves the group). Idempotent."""
        if self.closed:
            return
        if self.failed is not None:
            self.abort(self.failed)
            return
        if self.rank == 0:
            self.broadcast_step(None)
        with self._collective("the barrier at shutdown"):  # rank 0's store stays up until every worker has left
            dist.barrier(group=self.cpu_group)
        self.closed = True
        atexit.unregister(self.close)
        dist.destroy_process_group()
        _release(self)
        stuck = []
        for r, p in enumerate(self.workers, start=1):
            try:
                p.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                stuck.append(r)
        if stuck:
            raise TPError(f"worker ranks {stuck} did not exit within {self.timeout:g} s after the stop; killed them")


_ACTIVE: TPGroup | None = None  # one tensor-parallel engine per process (torch.distributed's default group)


def _release(group: TPGroup) -> None:
    global _ACTIVE
    if _ACTIVE is group:
        _ACTIVE = None


def setup(
    cfg: WorkspaceConfig, device: str, tensor_parallel_size: int | None, workspace, engine_args: dict
) -> TPGroup | None:
    """This process's TP group for an engine on `cfg`, or None to run in one process (ranks joined).

    Under torchrun (RANK / WORLD_SIZE set) the world size must equal config.ini's tensor_para_size.
    Otherwise tensor_parallel_size N > 1 (which must equal tensor_para_size) makes this process rank 0 and
    starts N - 1 workers running Engine(workspace, **engine_args) on their ranks.
    """
    global _ACTIVE
    tp = cfg.tensor_para_size
    if "WORLD_SIZE" in os.environ:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
        if tensor_parallel_size is not None and tensor_parallel_size != world:
            raise ValueError(
                f"tensor_parallel_size = {tensor_parallel_size} but this process was started by torchrun with "
                f"--nproc-per-node {world} (WORLD_SIZE); leave tensor_parallel_size unset under torchrun"
            )
        if world != tp:
            raise ValueError(
                f"torchrun --nproc-per-node {world} (WORLD_SIZE {world}) but the workspace's "
                f"tensor_para_size is {tp} (config.ini): run torchrun --nproc-per-node {tp}, or deploy the model "
                f"again with python -m deploy ... --tp {world}"
            )
        if world == 1:
            return None
        launched = None
    elif tensor_parallel_size is None or (tensor_parallel_size == 1 and tp == 1):
        return None
    else:
        if tensor_parallel_size != tp:
            raise ValueError(
                f"tensor_parallel_size = {tensor_parallel_size} but the workspace's tensor_para_size is {tp} "
                f"(config.ini): pass tensor_parallel_size={tp}, leave it unset to run the {tp} ranks joined in "
                f"one process, or deploy again with --tp {tensor_parallel_size}"
            )
        world, rank, launched = tp, 0, (workspace, engine_args)
    if _ACTIVE is not None:
        raise ValueError(
            f"a tensor-parallel engine (rank {_ACTIVE.rank} of {_ACTIVE.world_size}) is already running in this "
            "process; close it first (llm.shutdown() or engine.close())"
        )
    kind = torch.device(device).type
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if kind == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s())
    workers: list[subprocess.Popen] = []
    if launched is not None:
        store, workers = launch(world, *launched)
        try:
            dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=timeout)
        except BaseException:
            _kill(workers)
            raise
    elif os.environ.get(LAUNCHED_ENV):
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
        )
        store.set(f"kvq/joined/{rank}", "1")
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        store = None
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    if store is None:  # torchrun: rank 0 hosts a store for the steps; the others learn its port
        store = _step_store(rank, world, cpu_group, timeout)
    _ACTIVE = TPGroup(rank, world, dev, store, cpu_group, workers)
    return _ACTIVE


def _step_store(rank: int, world: int, cpu_group, timeout: timedelta) -> dist.TCPStore:
    """Under torchrun: a TCPStore on rank 0 (a free port, announced to the others over gloo)."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    store = (
        dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False) if rank == 0 else None
    )
    port = torch.tensor([store.port if store is not None else 0], dtype=torch.long)
    dist.broadcast(port, src=0, group=cpu_group)
    return store or dist.TCPStore(host, int(port), world, is_master=False, timeout=timeout)


def launch(world: int, workspace, engine_args: dict) -> tuple[dist.TCPStore, list[subprocess.Popen]]:
    """Rank 0 of LLM(tensor_parallel_size=N): start workers 1..N-1 and wait until each has reached its
    process-group join (a worker that exits first, e.g. on a bad argument, is an error at once)."""
    seconds = timeout_s()
    store = dist.TCPStore(
        "127.0.0.1", 0, world, is_master=True, timeout=timedelta(seconds=seconds), wait_for_workers=False
    )
    package_root = str(Path(__file__).resolve().parents[1])  # this checkout, whatever else is installed
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(world))
    env[LAUNCHED_ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    if "OMP_NUM_THREADS" not in os.environ:
        # Like torchrun: the ranks share the cores instead of each spinning on all of them (ranks wait for
        # each other at every all-reduce, so oversubscribed cores slow every rank; 4x measured on 2 cores).
        threads = max(1, len(os.sched_getaffinity(0)) // world)
        env["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)  # rank 0 is this process
    payload = pickle.dumps((str(workspace), engine_args))
    workers = []
    for r in range(1, world):
        p = subprocess.Popen(
            [sys.executable, "-m", "runtime.distributed"],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdin=subprocess.PIPE,
        )
        p.stdin.write(payload)
        p.stdin.close()
        workers.append(p)
    deadline = time.monotonic() + seconds
    for r, p in enumerate(workers, start=1):
        while not store.check([f"kvq/joined/{r}"]):
            if p.poll() is not None or time.monotonic() > deadline:
                how = _exit_text(p.returncode) if p.returncode is not None else f"no answer within {seconds:g} s"
                _kill(workers)
                raise TPError(
                    f"tensor-parallel worker rank {r} of {world} did not start ({how}); its error is printed above"
                )
            time.sleep(0.05)
    return store, workers


def run_worker(workspace, **engine_args) -> int:
    """A rank > 0: build this rank's engine, then run the forward passes rank 0 broadcasts until it says stop.

    Returns the process exit code (0 after rank 0's stop; errors are printed to stderr with the rank)."""
    from runtime.engine import Engine

    rank = int(os.environ.get("RANK", "0"))
    # Ctrl-C in the terminal reaches every process of the group: rank 0 decides (stop the answer, keep the
    # session); a worker that died on it would end the whole engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = Engine(workspace, **engine_args)
    except (ValueError, FileNotFoundError, TPError) as e:  # WorkspaceError is a ValueError: one line each
        sys.stderr.write(f"error: rank {rank}: {e}\n")
        return 2
    tp = engine.tp  # a TPGroup: WORLD_SIZE > 1 here, or Engine would have refused the world size
    try:
        with torch.inference_mode():
            while (step := tp.receive_step()) is not None:
                engine.model.forward(
                    step.tokens.to(engine.device),
                    engine.cache,
                    step.batch,
                    use_context_fmha=step.use_context_fmha,
                    all_logits=step.all_logits,
                )
    except TPError as e:
        sys.stderr.write(f"error: rank {rank}: {e}\n")
        return 1
    tp.close()
    return 0


def _kill(workers: list[subprocess.Popen]) -> None:
    for p in workers:
        p.kill()
        p.wait()


def _exit_text(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def main() -> int:
    """Entry point of a worker started by `launch`: (workspace, engine arguments) arrive pickled on stdin."""
    workspace, engine_args = pickle.load(sys.stdin.buffer)
    return run_worker(workspace, **engine_args)


if __name__ == "__main__":
    # The imported module's main, not this __main__ copy's: the engine raises runtime.distributed.TPError,
    # which run_worker must catch as the same class.
    from runtime import distributed

    sys.exit(distributed.main())
