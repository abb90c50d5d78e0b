"""Process groups on the CPU, made the way nerfstudio's launcher makes them on GPUs.

nerfstudio's ``launch`` asserts CUDA even for the gloo backend, so tests and ``benchmarks/ddp_scaling.py --device
cpu`` spawn their ranks themselves; this module holds what each rank does around its work, once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from nerfstudio.scripts.train import _find_free_port
from nerfstudio.utils import comms

RANK_LOG_LINES = 80
"""How many of a crashed rank's last stderr lines ``spawn_on_gloo``'s error quotes."""


def local_init_url() -> str:
    """A TCP rendezvous on a free port of this machine, as nerfstudio's ``dist_url="auto"`` picks it."""
    return f"tcp://127.0.0.1:{_find_free_port()}"


@contextlib.contextmanager
def gloo_process_group(
    rank: int, world_size: int, url: str, threads: int = 1, all_destroyed: Optional[Any] = None
) -> Iterator[None]:
    """One rank's gloo process group for the body of the ``with`` block.

    Like nerfstudio's ``_distributed_worker``, every rank waits at a barrier before the group is torn down: a rank
    that closes its connections while another still talks to it makes gloo's transport abort that other process
    (SIGABRT). After an exception there is no barrier, so a failing rank does not leave the others waiting on it.

    ``all_destroyed``: a ``multiprocessing`` barrier of ``world_size`` parties, passed at spawn. Each rank waits
    there after its group is destroyed, so rank 0, which hosts the rendezvous store, outlives every other rank's
    tear-down instead of exiting under it.
    """
    torch.set_num_threads(threads)  # the ranks share the machine's cores
    dist.init_process_group(backend="gloo", init_method=url, world_size=world_size, rank=rank)
    finished = False
    try:
        yield
        # The body's objects (a DDP module's reducer holds the group) are freed now, while every rank's group still
        # lives, not at interpreter exit after it is gone.
        gc.collect()
        comms.synchronize()
        finished = True
    finally:
        dist.destroy_process_group()
    if finished and all_destroyed is not None:
        all_destroyed.wait()


def spawn_on_gloo(main_func: Callable[..., object], world_size: int, config: object) -> None:
    """Run ``main_func(local_rank, world_size, config, global_rank)`` in ``world_size`` processes on one machine,
    each inside its gloo group: nerfstudio's ``launch`` with ``device_type="cpu"``, without its CUDA asserts.

    Each rank's stderr goes to a file, with ``faulthandler`` on, and is passed on to this process's stderr when the
    ranks end. A rank killed by a signal (a C++ abort leaves no Python traceback) raises with the end of every
    rank's stderr in the message, where a truncated CI log still shows it.
    """
    context = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="splatsem-gloo-") as logs:
        try:
            torch.multiprocessing.spawn(
                _gloo_entry,
                args=(world_size, local_init_url(), main_func, config, context.Barrier(world_size), logs),
                nprocs=world_size,
            )
        except torch.multiprocessing.ProcessExitedException as err:
            tails = "\n".join(
                f"--- rank {rank} stderr, last {RANK_LOG_LINES} lines ---\n{_tail(_rank_log(logs, rank))}"
                for rank in range(world_size)
            )
            raise RuntimeError(f"{err}\n{tails}") from err
        finally:
            for rank in range(world_size):
                path = _rank_log(logs, rank)
                if path.exists():
                    sys.stderr.write(path.read_text(errors="replace"))


def _rank_log(folder: str, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.stderr"


def _tail(path: Path) -> str:
    if not path.exists():
        return "(none written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-RANK_LOG_LINES:])


def _gloo_entry(
    rank: int,
    world_size: int,
    url: str,
    main_func: Callable[..., object],
    config: object,
    all_destroyed: Any,
    logs: str,
) -> None:
    log = open(_rank_log(logs, rank), "w", buffering=1)  # noqa: SIM115 (open until the process ends)
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)  # C++ messages (gloo, std::terminate) too, not only Python's
    faulthandler.enable(file=log, all_threads=True)  # Python stacks of every thread on SIGABRT or SIGSEGV
    with gloo_process_group(rank, world_size, url, all_destroyed=all_destroyed):
        main_func(rank, world_size, config, rank)
