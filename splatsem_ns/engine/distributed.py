"""Process groups on the CPU, made the way nerfstudio's launcher makes them on GPUs.

nerfstudio's ``launch`` asserts CUDA even for the gloo backend, so tests and ``benchmarks/ddp_scaling.py --device
cpu`` spawn their ranks themselves; this module holds what each rank does around its work, once.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from nerfstudio.scripts.train import _find_free_port
from nerfstudio.utils import comms


def local_init_url() -> str:
    """A TCP rendezvous on a free port of this machine, as nerfstudio's ``dist_url="auto"`` picks it."""
    return f"tcp://127.0.0.1:{_find_free_port()}"


@contextlib.contextmanager
def gloo_process_group(rank: int, world_size: int, url: str, threads: int = 1) -> Iterator[None]:
    """One rank's gloo process group for the body of the ``with`` block.

    Like nerfstudio's ``_distributed_worker``, every rank waits at a barrier before the group is torn down: a rank
    that closes its connections while another still talks to it makes gloo's transport abort that other process
    (SIGABRT). After an exception there is no barrier, so a failing rank does not leave the others waiting on it.
    """
    torch.set_num_threads(threads)  # the ranks share the machine's cores
    dist.init_process_group(backend="gloo", init_method=url, world_size=world_size, rank=rank)
    try:
        yield
        comms.synchronize()
    finally:
        dist.destroy_process_group()


def spawn_on_gloo(main_func: Callable[..., object], world_size: int, config: object) -> None:
    """Run ``main_func(local_rank, world_size, config, global_rank)`` in ``world_size`` processes on one machine,
    each inside its gloo group: nerfstudio's ``launch`` with ``device_type="cpu"``, without its CUDA asserts."""
    torch.multiprocessing.spawn(
        _gloo_entry, args=(world_size, local_init_url(), main_func, config), nprocs=world_size
    )


def _gloo_entry(
    rank: int, world_size: int, url: str, main_func: Callable[..., object], config: object
) -> None:
    with gloo_process_group(rank, world_size, url):
        main_func(rank, world_size, config, rank)
