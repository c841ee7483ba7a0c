"""A recipe run on several processes, started by torchrun or ``accelerate launch`` (or by
``edgedistill run --nproc N``, which starts torchrun's launcher): which process this is, joining
the launcher's process group, and how the main process and the others wait for each other.

The training stages run on every process (the Trainer gives each its share of a batch and
averages the gradients); the stages after them run on the main process while the others wait at
a barrier, so that each file of a run has one writer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .errors import EdgeDistillError
from .host import usable_cores
from .recipe_blocks import DistributedConfig

T = TypeVar("T")
# what a launcher sets for each process (torchrun, accelerate launch, a cluster's scheduler)
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """The processes of this run: how many, which one this is, the collective backend."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """What the report's environment says about the run's processes."""
        devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if self.backend == "nccl" else ["cpu"])
        return {"world_size": self.size, "backend": self.backend or "none",
                "devices": devices}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise EdgeDistillError(f"environment variable {name}={value!r} is not a whole number; "
                               "it is set by the launcher (torchrun, accelerate launch): unset "
                               "it or start the run with the launcher") from None


def current() -> World:
    """The world this process was launched into, read from the launcher's variables (the
    process group may not be joined yet)."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    backend = dist.get_backend() if dist.is_initialized() else None
    return World(size, _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), backend)


def is_main() -> bool:
    """Whether this process writes the run's shared files (the only process, or rank 0)."""
    return current().main


def pick_backend(setting: str) -> str:
    """``distributed.backend`` resolved on this machine: nccl on CUDA GPUs, gloo on CPUs."""
    gpus = torch.cuda.is_available()
    if setting == "nccl" and not gpus:
        raise EdgeDistillError("distributed.backend: nccl needs CUDA GPUs and this machine has "
                               "none; use gloo (or auto)")
    if setting == "auto":
        return "nccl" if gpus else "gloo"
    return setting


def join(cfg: DistributedConfig) -> World:
    """Join the launcher's process group (once per process) and return the world; a process
    started on its own is a world of one and joins nothing."""
    world = current()
    if world.size > 1 and world.backend is None:  # launched, and not joined yet
        backend = pick_backend(cfg.backend)
        _init_group(backend, cfg, world)
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        world = current()
    return world


def _init_group(backend: str, cfg: DistributedConfig, world: World) -> None:
    """The rendezvous gets ``cfg.rendezvous_timeout`` (a stale launcher environment fails
    fast); the group's collectives get ``cfg.wait_minutes`` (the other processes wait at a
    barrier while the main one quantizes and benchmarks). torch's ``init_process_group`` has
    one timeout for both, so the store is made first with the short one."""
    host, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    where = f"{host}:{port}"
    try:
        # a process that joins someone else's store looks for it first: torch's own attempt
        # would print pages of C++ traces before failing
        if (world.rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True") \
                and not _listening(host, port, cfg.rendezvous_timeout):
            raise TimeoutError(f"nothing listens at {where}")
        store, rank, size = next(dist.rendezvous(
            "env://", world.rank, world.size, timeout=timedelta(seconds=cfg.rendezvous_timeout)))
    except (RuntimeError, ValueError, TimeoutError) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise EdgeDistillError(
            f"rank {world.rank}: could not join the other {world.size - 1} process(es) at "
            f"{where} within {cfg.rendezvous_timeout:g} s ({reason}); the launcher variables "
            f"({', '.join(LAUNCHER_VARIABLES)}) are stale or their processes are gone: unset "
            "them to run in one process, or start the run with torchrun, accelerate launch or "
            "`edgedistill run --nproc N`") from None
    wait = timedelta(minutes=cfg.wait_minutes)
    store.set_timeout(wait)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=wait)


def _listening(host: str, port: str, seconds: float) -> bool:
    """Whether something accepts connections at ``host:port`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return True
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)


def on_main(world: World, work: Callable[[], T], what: str) -> T:
    """Run ``work`` on the main process while the others wait; every process gets its result
    (which must pickle). When it fails there, the others stop too, with a line that points to
    the main process's error rather than a wait that ends in a timeout."""
    if world.size == 1:
        return work()
    outcome: list = [None]
    if world.main:
        try:
            outcome = [(True, work())]
        except BaseException:
            dist.broadcast_object_list([(False, None)], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise EdgeDistillError(f"rank {world.rank}: stopped because {what} failed on the main "
                               "process (rank 0; its error is above)")
    return value


@contextlib.contextmanager
def all_cores(world: World) -> Iterator[None]:
    """Let the main process use every core of its machine while the others wait at a barrier
    (they sleep there: 0-2 % of a core measured): a launcher gave it only its share."""
    if world.size == 1 or not world.main:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def per_device_batch(batch_size: int, cfg: DistributedConfig, world_size: int,
                     where: str) -> int:
    """The examples each process takes per step for a recipe's ``batch_size``
    (``distributed.batch`` says what that counts)."""
    if cfg.batch == "per-device" or world_size == 1:
        return batch_size
    if batch_size % world_size:
        raise EdgeDistillError(f"{where}: {batch_size} examples a step do not split evenly over "
                               f"{world_size} processes (distributed.batch: global); use a "
                               f"multiple of {world_size}, or distributed.batch: per-device")
    return batch_size // world_size


def global_batch(batch_size: int, cfg: DistributedConfig, world_size: int) -> int:
    """The examples of one optimizer step over all processes."""
    return batch_size * world_size if cfg.batch == "per-device" else batch_size


def launch(nproc: int, argv: list[str]) -> int:
    """Start ``python -m edgedistill ARGV`` on ``nproc`` processes of this machine through
    torchrun's launcher (``torch.distributed.launcher``: standalone rendezvous on a free port,
    no restarts); return 0, or the exit code of the first process that failed (the launcher
    then stops the others). Each process gets an equal share of the cores unless OMP_NUM_THREADS
    says otherwise."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if current().size > 1:
        raise EdgeDistillError("--nproc: this process was itself started by a launcher "
                               "(WORLD_SIZE is set); drop --nproc, or run edgedistill without "
                               "the launcher")
    gpus = torch.cuda.device_count()
    available, what = (gpus, "GPUs") if gpus else (usable_cores(), "usable CPU cores")
    if not 1 <= nproc <= available:
        raise EdgeDistillError(f"--nproc {nproc}: this machine has {available} {what}; use "
                               f"1 to {available}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"edgedistill-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    # the processes print their own errors; the launcher's log of the same failure (and its
    # start-up chatter) would only repeat them
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "edgedistill", *argv)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()  # the cause; the launcher stopped the others
        code = first.exitcode
        if code < 0:  # killed by a signal: the shell's convention, 128 + its number
            code = 128 - code
            print(f"edgedistill: error: process rank {rank} (pid {first.pid}) was killed by "
                  f"signal {-first.exitcode}; rerun the same command to resume (finished "
                  "stages are kept)", file=sys.stderr)
        return code
    return 0
