"""A registered method's trainer on one scene, set up in this process: what the benchmarks and
``splatsem-fit-collection`` train with (no viewer, no periodic evaluation or checkpoints)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch


def one_scene_config(
    method: str,
    data: Path,
    out: Path,
    iterations: int,
    teachers: Optional[Sequence[str]] = None,
    eval_mode: Optional[str] = None,
):
    """A copy of ``method``'s registered TrainerConfig for ``iterations`` steps on the scene ``data``: the project's
    dataparser (it checks the scene and reads its seed points without open3d), no periodic evaluation or saving,
    tensorboard logs under ``out``, CUDA where there is one; ``teachers`` for methods that distil."""
    from nerfstudio.configs.method_configs import all_methods

    from splatsem_ns.data.dataparser import SplatsemDataParserConfig

    if method not in all_methods:
        raise ValueError(f"unknown method {method!r}; registered: {sorted(all_methods)}")
    config = copy.deepcopy(all_methods[method])
    datamanager = config.pipeline.datamanager
    datamanager.data = Path(data)
    datamanager.dataparser = SplatsemDataParserConfig(load_3D_points=True)
    if eval_mode is not None:
        datamanager.dataparser.eval_mode = eval_mode
    if teachers is not None and hasattr(datamanager, "teachers"):
        datamanager.teachers = tuple(teachers)
    config.max_num_iterations = iterations
    config.steps_per_save = 10**9
    config.steps_per_eval_image = config.steps_per_eval_batch = config.steps_per_eval_all_images = 10**9
    if hasattr(config, "save_every_minutes"):
        config.save_every_minutes = 0.0  # no checkpoints on the clock either
    config.vis = "tensorboard"
    config.output_dir = Path(out)
    config.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    config.viewer.quit_on_train_completion = True
    return config


def setup_trainer(config):
    """A set-up nerfstudio Trainer of ``config``; stock splatfacto downloads LPIPS weights when built, which offline
    machines cannot (``optional_lpips``)."""
    from nerfstudio.engine.trainer import Trainer

    from splatsem_ns.models.optional_lpips import optional_lpips

    trainer = Trainer(config, local_rank=0, world_size=1)
    with optional_lpips():
        trainer.setup()
    return trainer


@contextmanager
def own_event_writers() -> Iterator[None]:
    """Keep the event writers that trainers set up inside the block to the block.

    nerfstudio's event writers are process-global: every trainer set up appends its own (tensorboard's among them)
    and none is ever removed, so each later trainer of the process also writes its scalars into every earlier
    run's event file, and fails once such a run's folder is gone (a temporary one, say). On exit the writers added
    inside the block are closed and nerfstudio's writer state is as it was before."""
    from nerfstudio.utils import writer

    writers, storage, buffer = (
        list(writer.EVENT_WRITERS),
        list(writer.EVENT_STORAGE),
        dict(writer.GLOBAL_BUFFER),
    )
    try:
        yield
    finally:
        drop_event_writers(keep=writers)
        writer.EVENT_STORAGE[:] = storage
        writer.GLOBAL_BUFFER.clear()
        writer.GLOBAL_BUFFER.update(buffer)


def drop_event_writers(keep: Sequence = ()) -> None:
    """Close nerfstudio's process-global event writers other than ``keep`` (tensorboard's files are flushed) and
    leave only those registered (``own_event_writers``)."""
    from nerfstudio.utils import writer

    for event_writer in writer.EVENT_WRITERS:
        if not any(event_writer is kept for kept in keep) and hasattr(event_writer, "tb_writer"):
            event_writer.tb_writer.close()
    writer.EVENT_WRITERS[:] = list(keep)
