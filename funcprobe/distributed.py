"""The probe on several processes through ``torch.distributed`` (issue 6): helpers shared by δH₁, ΔH and the CLI.

Sharding: prompts (or δH₁'s units) are split into contiguous shards by index, the first ``B % world`` ranks taking
one more (:func:`shard_prompts`), so any B works with any world size. Every rank holds the whole batch (its tokens
are cheap) and computes only its shard; the pieces are combined so that every rank ends with the same numbers:

* :func:`all_reduce_sum_` — LoRA-sized float64 sums (ΣX, ΣY, the RL gradient), one flat buffer per call;
* :func:`gather_rows` / :func:`gather_scalars` — per-prompt (or per-unit) rows of unequal count per rank, padded to
  the largest shard for ``all_gather`` and reassembled in global prompt order.

Every byte a rank sends through these helpers is counted in :data:`COMM` (:class:`CommCounter`): payload bytes
of the tensors handed to the collective by this rank (an all_reduce of n float64 counts 8n, an all_gather of a
padded [m, k] float64 block counts 8mk), so the bench can report bytes per δH₁.

Failures: :func:`init_from_env` sets the process group's timeout; every collective here goes through
:func:`_collective`, which turns a gloo/NCCL error (a peer that exited, or a timeout) into a
:class:`DistributedError` naming this rank and — when the failing rank recorded it in the rendezvous store with
:func:`record_failure` — the rank that failed and its error.

A *checked* world (``World(checked=True)``, the TRL callback's, whose process group also carries the training's own
collectives) never leaves a rank waiting for a peer that failed and moved on: every collective here is preceded by
:func:`failure_flag`, an all-reduce of one int per rank, and a rank that fails outside a collective calls
``failure_flag(world, True)`` exactly once (at the point where its peers will next be in a collective of this module,
or at the end of the region). The peers' next flag meets that one, they raise :class:`PeerFailure`, and every rank
leaves the region together, so the process group's sequence of collectives stays the same on every rank.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["World", "CommCounter", "COMM", "DistributedError", "init_from_env", "shard_prompts", "shard_counts",
           "all_reduce_sum_", "gather_rows", "gather_scalars", "all_gather_objects", "record_failure", "barrier",
           "shutdown", "PeerFailure", "failure_flag", "world_of_process_group"]

FAILURE_KEY = "funcprobe/failed_rank"
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A collective failed: a peer rank raised/exited, or the collective timed out."""


class PeerFailure(DistributedError):
    """A checked world's failure flag says that another rank failed (see the module docstring)."""


@dataclass
class CommCounter:
    """Payload bytes sent by this rank through the helpers of this module, by operation."""

    bytes_sent: int = 0
    calls: int = 0
    by_op: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: int) -> None:
        self.bytes_sent += int(nbytes)
        self.calls += 1
        self.by_op[op] = self.by_op.get(op, 0) + int(nbytes)

    def reset(self) -> None:
        self.bytes_sent, self.calls, self.by_op = 0, 0, {}

    def snapshot(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "calls": self.calls, "by_op": dict(self.by_op)}


#: The process-wide counter of communicated bytes.
COMM = CommCounter()


@dataclass(frozen=True)
class World:
    """This process's place: rank, world size, whether a process group is in use, and the collectives' device."""

    rank: int = 0
    size: int = 1
    distributed: bool = False
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: object | None = None
    #: every collective of this module is preceded by :func:`failure_flag` (module docstring)
    checked: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, B: int) -> range:
        return shard_prompts(B, self.rank, self.size)


SINGLE = World()


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                  device: str | torch.device | None = None) -> World:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Not launched by torchrun (no WORLD_SIZE, or WORLD_SIZE=1): a world of size 1 with no process group. Backend:
    ``nccl`` when ``device`` is CUDA (each rank takes cuda:LOCAL_RANK), else ``gloo``. ``timeout_s`` bounds every
    collective: a peer that hangs or dies makes the others fail after at most that long.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), dist.get_world_size() > 1, dist.get_backend(),
                     timeout_s)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    cuda = device is not None and torch.device(device).type == "cuda"
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    return World(dist.get_rank(), dist.get_world_size(), True, backend, float(timeout_s))


def world_of_process_group(checked: bool = True) -> World:
    """The :class:`World` of the process group someone else initialised (accelerate, torchrun + Trainer): this rank,
    its size and backend; a single process when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), True, dist.get_backend(), checked=bool(checked))


def shutdown(world: World, wait_s: float = 10.0) -> None:
    """Leave the process group (no-op for a single process).

    Rank 0 hosts the rendezvous TCPStore: it waits (at most ``wait_s``) until the other ranks have left the group
    before it exits, so that no rank loses the store in the middle of its own teardown.
    """
    import torch.distributed as dist

    if not (world.distributed and dist.is_initialized()):
        return
    store = None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:
        pass
    dist.destroy_process_group()
    if store is None:
        return
    try:
        if world.rank != 0:
            store.add("funcprobe/left", 1)
            return
        deadline = time.monotonic() + wait_s
        while store.add("funcprobe/left", 0) < world.size - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # a peer or the store already gone: nothing left to wait for
        pass


# ---------------------------------------------------------------------------------------------------- sharding
def shard_counts(B: int, world: int) -> list[int]:
    """Prompts per rank: B // world each, the first B % world ranks one more."""
    if world < 1 or B < 0:
        raise ValueError(f"shard_counts needs world ≥ 1 and B ≥ 0; got B={B}, world={world}.")
    base, extra = divmod(B, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard_prompts(B: int, rank: int, world: int) -> range:
    """The contiguous prompt indices of ``rank``'s shard (deterministic; empty when B < world for late ranks)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of size {world}.")
    counts = shard_counts(B, world)
    start = sum(counts[:rank])
    return range(start, start + counts[rank])


# ------------------------------------------------------------------------------------------------- collectives
def record_failure(world: World, error: BaseException) -> None:
    """Tell the other ranks (through the rendezvous store) that this rank failed and why; best effort."""
    if not world.distributed:
        return
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        text = " ".join(str(error).split()) or type(error).__name__
        _get_default_store().set(FAILURE_KEY, f"rank {world.rank}: {type(error).__name__}: {text[:500]}")
    except Exception:  # the store may be gone (rank 0 exited): the peers still fail on their collective
        pass


def _failure_note() -> str | None:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        if store.check([FAILURE_KEY]):
            return store.get(FAILURE_KEY).decode()
    except Exception:  # the TCPStore is served by rank 0: unreachable means rank 0 is gone
        return "rank 0 (it hosts the rendezvous store, which is unreachable: rank 0 exited or crashed)"
    return None


def _collective(world: World, what: str, fn: Callable[[], None], *, check: bool = True) -> None:
    if check and world.checked:
        failure_flag(world, False, what)
    try:
        fn()
    except Exception as error:  # gloo raises RuntimeError / DistBackendError on a dead peer or a timeout
        note = _failure_note()
        cause = f"failed rank — {note}" if note else (
            f"a peer rank exited or did not reach it within the timeout ({world.timeout_s:g}s)")
        raise DistributedError(f"rank {world.rank}/{world.size}: {what} failed: {cause}. "
                               f"({type(error).__name__}: {' '.join(str(error).split())[:300]})") from error


def failure_flag(world: World, failed: bool, what: str = "failure flag") -> None:
    """All ranks say whether they failed (an all-reduce of one int per rank). Raises :class:`PeerFailure` on every
    rank that did not fail when another did (naming it and, where it called :func:`record_failure`, its error); a
    rank that failed (``failed=True``) returns. A no-op for a single process."""
    if not world.distributed:
        return
    import torch.distributed as dist

    flags = torch.zeros(world.size, dtype=torch.int64, device=world.comm_device)
    flags[world.rank] = int(bool(failed))
    COMM.add("failure_flag", flags.numel() * flags.element_size())
    _collective(world, what, lambda: dist.all_reduce(flags, op=dist.ReduceOp.SUM), check=False)
    ranks = [r for r, flag in enumerate(flags.cpu().tolist()) if flag]
    if ranks and not failed:
        note = _failure_note()
        raise PeerFailure(f"rank {world.rank}/{world.size}: rank(s) {ranks} failed before {what}"
                          + (f" — {note}" if note else ""))


def barrier(world: World, what: str = "barrier") -> None:
    """A barrier that fails with a :class:`DistributedError` instead of hanging (an all_reduce of one int)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    flag = torch.zeros(1, dtype=torch.int64, device=world.comm_device)
    _collective(world, what, lambda: dist.all_reduce(flag))


def all_reduce_sum_(world: World, tensors: Mapping[str, Tensor], what: str = "all_reduce") -> None:
    """Sum float64 CPU tensors over ranks, in place (one flat buffer; identical result on every rank)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    names = list(tensors)
    for name in names:
        if tensors[name].dtype != torch.float64:
            raise ValueError(f"all_reduce_sum_ takes float64 tensors; {name} is {tensors[name].dtype}.")
    flat = torch.cat([tensors[name].reshape(-1) for name in names]).to(world.comm_device)
    COMM.add("all_reduce", flat.numel() * flat.element_size())
    _collective(world, what, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
    flat = flat.cpu()
    offset = 0
    for name in names:
        n = tensors[name].numel()
        tensors[name].copy_(flat[offset:offset + n].reshape(tensors[name].shape))
        offset += n


def gather_rows(world: World, rows: Tensor, counts: Sequence[int], what: str = "all_gather") -> Tensor:
    """Every rank's ``rows`` [counts[rank], ...] concatenated in rank order (= global prompt order): [Σ counts, ...].

    Shards of unequal size are padded to the largest for ``all_gather`` (the padding is counted as sent).
    """
    if not world.distributed:
        return rows
    import torch.distributed as dist

    counts = list(counts)
    if rows.shape[0] != counts[world.rank]:
        raise ValueError(f"rank {world.rank} gathers {rows.shape[0]} rows but its shard has {counts[world.rank]}.")
    width = max(max(counts), 1)
    padded = torch.zeros((width, *rows.shape[1:]), dtype=rows.dtype)
    padded[:rows.shape[0]] = rows
    padded = padded.to(world.comm_device)
    out = [torch.empty_like(padded) for _ in range(world.size)]
    COMM.add("all_gather", padded.numel() * padded.element_size())
    _collective(world, what, lambda: dist.all_gather(out, padded))
    return torch.cat([piece.cpu()[:count] for piece, count in zip(out, counts)])


def gather_scalars(world: World, values: Tensor, counts: Sequence[int], what: str = "all_gather") -> Tensor:
    """1-D float64 per-rank vectors of unequal length, reassembled in global order (see :func:`gather_rows`)."""
    return gather_rows(world, values.reshape(-1).to(torch.float64), counts, what)


def all_gather_objects(world: World, obj, what: str = "all_gather_object") -> list:
    """Every rank's picklable ``obj`` in rank order, ``None`` entries dropped (pickled size counted)."""
    if not world.distributed:
        return [] if obj is None else [obj]
    import pickle

    import torch.distributed as dist

    COMM.add("all_gather_object", len(pickle.dumps(obj)))
    pieces: list = [None] * world.size
    _collective(world, what, lambda: dist.all_gather_object(pieces, obj))
    return [p for p in pieces if p is not None]
