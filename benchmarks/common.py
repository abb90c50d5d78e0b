"""What the benchmark scripts share: building a nerfstudio Trainer for a method with overrides, seeding."""

from __future__ import annotations

import argparse
import gc
import random
import typing
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch


def trainer_config(
    method: str,
    data: Path,
    out: Path,
    iterations: int,
    teachers: Optional[Sequence[str]] = None,
    random_weights: bool = False,
    overrides: Optional[dict] = None,
    full_resolution: bool = True,
    eval_mode: Optional[str] = None,
):
    """A copy of the registered method's TrainerConfig set up for a benchmark run.

    Every method uses the same dataparser (splatsem-data), no periodic eval or saving, tensorboard
    logging and, with ``full_resolution``, no coarse-to-fine schedule (``num_downscales=0``).
    ``overrides`` sets model config fields; dotted keys reach nested configs (``semantic_source.latent_dim``),
    and keys that start with ``dataparser.``, ``datamanager.`` or ``pipeline.`` set those configs' fields
    (``dataparser.seed_points=depth``, ``pipeline.semantic_eval.render_scale=0.5``).
    The key ``optimizer`` ("fused" or "default") switches every Adam group's implementation.
    """
    from splatsem_ns.engine.one_scene import one_scene_config

    cfg = one_scene_config(method, data, out, iterations, eval_mode=eval_mode)
    if full_resolution:
        cfg.pipeline.model.num_downscales = 0
    cfg.experiment_name = "bench"
    cfg.timestamp = method
    overrides = dict(overrides or {})
    optimizer = overrides.pop("optimizer", None)
    if optimizer is not None:  # "fused" or "default": the same Adam settings, another implementation
        from splatsem_ns.engine.optimizers import with_optimizer_implementation

        if optimizer not in ("fused", "default"):
            raise ValueError(f"optimizer={optimizer!r}: use 'fused' or 'default'")
        cfg.optimizers = with_optimizer_implementation(cfg.optimizers, fused=optimizer == "fused")
    roots = {
        "dataparser": cfg.pipeline.datamanager.dataparser,
        "datamanager": cfg.pipeline.datamanager,
        "pipeline": cfg.pipeline,
    }
    for key, value in overrides.items():
        first, _, rest = key.partition(".")
        if rest and first in roots:
            set_field(roots[first], rest, value)
        else:
            set_field(cfg.pipeline.model, key, value)
    if teachers is not None and hasattr(cfg.pipeline.datamanager, "teachers"):
        dm = cfg.pipeline.datamanager
        dm.teachers = tuple(teachers)
        dm.teacher_random_weights = random_weights
        dm.feature_cache_dir = out / "feature_cache"
    return cfg


def set_field(config, key: str, value: str) -> None:
    """Set ``config``'s field ``key`` (dotted for nested configs, e.g. ``encoder.input_variant``) from a
    command-line string, converted by ``parse_field``."""
    *parents, leaf = key.split(".")
    for parent in parents:
        config = getattr(config, parent)
    setattr(config, leaf, parse_field(config, leaf, value))


def parse_field(config, name: str, value: str):
    """``value`` (a string from the command line) converted to the declared type of ``config.name``: bools take
    true/false, Optional fields also take "none", Literal fields keep their (string) choices, tuples take their
    entries separated by ";" (a "," ends the field in a run spec)."""
    try:
        hint = typing.get_type_hints(type(config)).get(name, type(getattr(config, name)))
    except (NameError, TypeError):  # an annotation that does not resolve here: go by the current value
        hint = type(getattr(config, name))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint):  # Optional[X]
        if str(value).lower() == "none":
            return None
        hint = args[0] if len(args) == 1 else str
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{name}={value!r}: choose one of {list(choices)}")
        return value
    if hint is bool:
        if str(value).lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return str(value).lower() in ("true", "1")
    if hint in (int, float, str, Path):
        return hint(value)
    if typing.get_origin(hint) is tuple or isinstance(getattr(config, name), tuple):  # entries split at ";"
        return tuple(entry for entry in str(value).split(";") if entry)
    return type(getattr(config, name))(value)


def add_point_shape_argument(parser, how: str) -> None:
    """``--point-shape``: the shape of the Gaussians made from a point cloud (``MultiSceneDataManagerConfig.
    point_shape``), ``how`` saying where it applies."""
    parser.add_argument(
        "--point-shape",
        default="ball",
        choices=("ball", "surfel"),
        help=f"shape of the Gaussians made from a point cloud, {how}",
    )


def scene_run_parser(
    doc: Optional[str], teachers: Optional[Sequence[str]] = None, data_required: bool = True
) -> argparse.ArgumentParser:
    """A parser with the options every benchmark that trains on one scene takes: ``--data`` (the scene), ``--out``,
    ``--teachers`` (default ``teachers``, else chorus-splat's defaults), ``--random-weights`` and ``--seed``."""
    from splatsem_ns.teachers.registry import DEFAULT_TEACHERS

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=data_required, help="the scene (a nerfstudio data folder)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--teachers", nargs="+", default=list(teachers or DEFAULT_TEACHERS))
    parser.add_argument(
        "--random-weights", action="store_true", help="random-weight teachers: no downloads, for speed only"
    )
    parser.add_argument("--seed", type=int, default=42)
    return parser


def build_trainer(cfg):
    """A set-up Trainer (``splatsem_ns.engine.one_scene.setup_trainer``)."""
    from splatsem_ns.engine.one_scene import setup_trainer

    return setup_trainer(cfg)


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``METHOD`` or ``LABEL=METHOD:field=value,field=value`` -> (label, method, model overrides)."""
    label, _, rest = spec.partition("=") if "=" in spec.split(":")[0] else (spec.split(":")[0], "", spec)
    method, _, fields = (rest or spec).partition(":")
    overrides = dict(f.split("=", 1) for f in fields.split(",") if f)
    return label, method, overrides


def write_markdown(path: Path, lines: Sequence[str]) -> None:
    """Write a report's markdown table (one string per line) and print it."""
    text = "\n".join(lines)
    Path(path).write_text(text + "\n")
    print(text, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib(resident: int = 0) -> Optional[float]:
    """Peak GPU memory since the last reset, less ``resident`` bytes that were already allocated then (what earlier
    runs of the process still hold, from ``release_earlier_runs``): the run's own peak."""
    if not torch.cuda.is_available():
        return None
    return round((torch.cuda.max_memory_allocated() - resident) / 2**30, 3)


def release_earlier_runs() -> int:
    """Free what earlier runs in this process left, and restart the peak-memory count; returns the bytes the GPU
    still holds. A nerfstudio trainer holds reference cycles (callbacks bound to the pipeline, among others), so
    ``del trainer`` frees its tensors only when Python's cyclic collector next runs: without this, a run measured
    after another counted up to 1 GiB of its predecessor's tensors as its own peak (train_speed_h200_rounds_cut.md).

    Also drops earlier runs' event writers (see below), forgets what ``torch.compile`` built for earlier runs and
    zeroes its counts (``compile_counts``). Dynamo keeps compiled code per function, not per model, so a later run of
    the same losses reused an earlier run's code where the compile settings matched, and every variant that
    differed added an entry, up to Dynamo's limit of 8 per function, past which the function silently runs eagerly.
    Each run now compiles as it would in a process of its own (inductor's on-disk cache still spares it most of the
    compile time, which warm-up leaves out)."""
    import torch._dynamo
    from nerfstudio.utils import writer
    from torch._dynamo.utils import counters

    from splatsem_ns.engine.one_scene import drop_event_writers
    from splatsem_ns.models.compile_options import release_held_options

    release_held_options()  # a run that failed inside an iteration left its compile options held
    # nerfstudio's event writers are process-global and never removed: each run set up after others also wrote its
    # scalars into every earlier run's event file, on the timed steps that log. Each run sets up its own.
    drop_event_writers()
    writer.EVENT_STORAGE.clear()
    gc.collect()
    torch._dynamo.reset()
    counters.clear()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def compile_counts() -> Dict[str, int]:
    """What ``torch.compile`` did since ``release_earlier_runs``: functions (frames) Dynamo compiled, and failed to;
    graph breaks (each resumes in a new frame, eagerly between); the graphs inductor built; and the graphs that
    asked for CUDA graphs (``compile_mode=reduce-overhead``) and ran without them, with inductor's reason logged."""
    from torch._dynamo.utils import counters

    return {
        "frames_compiled": counters["frames"]["ok"],
        "frames_failed": counters["frames"]["total"] - counters["frames"]["ok"],
        "graph_breaks": sum(counters["graph_break"].values()) + sum(counters["resumes"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }


def device_name() -> str:
    import platform

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
