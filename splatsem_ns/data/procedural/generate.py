"""Collections of procedural scenes: parallel generation, resuming, and the collection index.

``generate_collection(out, config)`` writes scenes ``out/proc_000000``, ``out/proc_000001``, ... and the index
``out/collection.json`` (``splatsem_ns.data.collection.SceneCollection``). Scene ``i`` is a function of
(settings, seed, i) only, so the files do not depend on the number of workers or the order they finish in, and
scene names (hence splits, a hash of the name) never change when a collection grows.

Nothing is lost on interruption: each scene is written into a hidden temporary folder next to its final place
(``.proc_000012.partial-<random>``) and renamed into place when complete, so a folder with a scene's name is
always a finished scene. Running the same command again skips finished scenes, deletes partial folders left by
an interrupted run, generates what is missing and rewrites the index. Ctrl-C lets the workers finish the scenes
they are on, writes the index of what is done and stops.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from splatsem_ns.data.class_tables import NYU40
from splatsem_ns.data.collection import INDEX_FILE, CollectionError, SceneCollection, SceneEntry, split_of
from splatsem_ns.data.procedural.scene import (
    GENERATOR_VERSION,
    ProceduralSceneConfig,
    generator_record,
    read_scene_record,
    write_scene,
)
from splatsem_ns.files import hidden_sibling, sync_folder

SCENE_PREFIX = "proc_"
LOCK_FILE = ".generating.lock"
"""Held (with the owner's process id) while a generator writes into a collection folder."""
_SCENE = re.compile(r"^proc_\d{6}$")
_PARTIAL = re.compile(r"^\.proc_\d{6}\.(partial|stale)-[0-9a-f]{16}$")
_RATE_EVERY_SECONDS = 30.0


def scene_name(index: int) -> str:
    """Folder name (and collection name) of scene ``index``."""
    return f"{SCENE_PREFIX}{index:06d}"


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class CollectionConfig:
    """A procedural collection."""

    num_scenes: int
    """Scenes in the collection (``proc_000000`` ... ``proc_<num_scenes-1>``)."""
    seed: int = 0
    """Seed of the collection: scene i is a function of (settings, seed, i)."""
    workers: Optional[int] = None
    """Worker processes (default: the number of CPUs available). 1 generates in this process."""
    val_fraction: float = 0.05
    """Fraction of scenes in the validation split (by a hash of the scene name)."""
    test_fraction: float = 0.05
    """Fraction of scenes in the test split (by a hash of the scene name)."""
    scene: ProceduralSceneConfig = field(default_factory=ProceduralSceneConfig)
    """Settings of every scene."""
    overwrite: bool = False
    """Regenerate finished scenes that were written with other settings (otherwise they are an error)."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_scenes <= 1_000_000:
            raise ValueError(f"num_scenes must be in 1..1000000, got {self.num_scenes}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        split_of(
            "probe", self.val_fraction, self.test_fraction
        )  # raises on fractions that leave no training split


def _generate_one(
    out: str, config: ProceduralSceneConfig, seed: int, index: int
) -> Tuple[int, Dict[str, Any], float]:
    """Write scene ``index`` through a hidden temporary folder renamed into place; returns (index, statistics,
    seconds). A finished scene already in place (other settings, or damaged) is swapped out after the new one is
    complete."""
    start = time.perf_counter()
    final = Path(out) / scene_name(index)
    temporary = hidden_sibling(final, "partial")
    try:
        stats = write_scene(temporary, config, seed, index)
        if final.exists():
            stale = hidden_sibling(final, "stale")
            os.rename(final, stale)
            os.rename(temporary, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return index, stats, time.perf_counter() - start


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: the parent decides (it lets running scenes finish).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _clean_partials(out: Path) -> List[str]:
    removed = []
    for entry in sorted(out.iterdir()):
        if entry.is_dir() and _PARTIAL.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def _plan(out: Path, config: CollectionConfig) -> Tuple[List[int], Dict[int, Dict[str, Any]], List[str]]:
    """Which scenes to generate, the statistics of the finished ones, and problems found."""
    todo: List[int] = []
    done: Dict[int, Dict[str, Any]] = {}
    mismatched: List[str] = []
    for index in range(config.num_scenes):
        folder = out / scene_name(index)
        if not folder.exists():
            todo.append(index)
            continue
        record = read_scene_record(folder)
        expected = generator_record(config.scene, config.seed, index)
        if record is None or "stats" not in record:
            todo.append(index)  # damaged (no readable transforms.json): made again
        elif record.get("generator") != expected:
            if config.overwrite:
                todo.append(index)
            else:
                mismatched.append(scene_name(index))
        else:
            done[index] = record["stats"]
    return todo, done, mismatched


def generate_collection(out: Path, config: CollectionConfig, console=None) -> SceneCollection:
    """Generate (or complete) the collection in ``out`` and write its index; returns the index.

    Raises:
        CollectionError: finished scenes in ``out`` were written with other settings (and ``overwrite`` is off).
        KeyboardInterrupt: on Ctrl-C, after the scenes in progress are finished and the index of the finished
            ones is written.
    """
    if console is None:
        from nerfstudio.utils.rich_utils import CONSOLE as console
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _generate_locked(out, config, console)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One generator per folder at a time: a second one would delete the first one's partial scenes. The lock
    holds the owner's process id, so a lock left by a killed run is taken over."""
    lock = out / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise CollectionError(
                    f"{out} is being generated by process {pid}; wait for it to finish (or remove {lock} if that "
                    "process is not a generator)"
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that was killed
            continue
        with os.fdopen(fd, "w") as stream:
            stream.write(f"{os.getpid()}\n")
        break
    else:
        raise CollectionError(f"cannot take the generation lock {lock}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _generate_locked(out: Path, config: CollectionConfig, console) -> SceneCollection:
    from splatsem_ns.progress import ProgressLog

    beyond = [
        entry.name
        for entry in out.iterdir()
        if _SCENE.match(entry.name) and int(entry.name[len(SCENE_PREFIX) :]) >= config.num_scenes
    ]
    if beyond:
        console.log(
            f"{len(beyond)} scene folder(s) past --num-scenes {config.num_scenes} are kept but not indexed."
        )
    removed = _clean_partials(out)
    if removed:
        console.log(f"Removed {len(removed)} partial scene folder(s) left by an interrupted run.")
    todo, done, mismatched = _plan(out, config)
    if mismatched:
        raise CollectionError(
            f"{out}: {len(mismatched)} finished scene(s) were generated with other settings or another seed "
            f"({', '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''}); use the same settings to resume, "
            "another --out, or --overwrite to regenerate them"
        )
    workers = min(config.workers or default_workers(), max(1, len(todo)))
    if done:
        console.log(
            f"{len(done)} of {config.num_scenes} scenes already finished in {out}; generating {len(todo)}."
        )

    start = time.perf_counter()
    scene_seconds: List[float] = []
    failures: List[str] = []
    interrupted = False
    rate = {"last": start}

    def finished(index: int, stats: Dict[str, Any], seconds: float, progress: ProgressLog) -> None:
        done[index] = stats
        scene_seconds.append(seconds)
        progress.advance()
        now = time.perf_counter()
        if now - rate["last"] >= _RATE_EVERY_SECONDS and progress.done < progress.total:
            rate["last"] = now
            console.log(
                f"{progress.done}/{progress.total} scenes, {60 * progress.done / (now - start):.1f} scenes/min"
            )

    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        # SIGTERM (a scheduler's stop) ends generation like Ctrl-C: finished scenes stay, the index is written.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        previous_term = None
    try:
        with ProgressLog(
            f"Procedural scenes ({workers} worker{'s' if workers > 1 else ''})",
            len(todo),
            "scenes",
            console=console,
        ) as progress:
            if workers == 1:
                for index in todo:
                    try:
                        result = _generate_one(str(out), config.scene, config.seed, index)
                    except Exception as err:  # one broken scene must not lose the others
                        failures.append(f"{scene_name(index)}: {type(err).__name__}: {err}")
                        continue
                    finished(*result, progress)
            else:
                context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
                with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
                    pending: Dict[Future, int] = {}
                    queue = list(todo)
                    try:
                        while queue or pending:
                            # A bounded queue: Ctrl-C then waits for a few scenes, not for thousands.
                            while queue and len(pending) < 2 * workers:
                                index = queue.pop(0)
                                pending[
                                    pool.submit(_generate_one, str(out), config.scene, config.seed, index)
                                ] = index
                            complete, _ = wait(pending, return_when=FIRST_COMPLETED)
                            for future in complete:
                                index = pending.pop(future)
                                try:
                                    finished(*future.result(), progress)
                                except Exception as err:  # one broken scene must not lose the others
                                    failures.append(f"{scene_name(index)}: {type(err).__name__}: {err}")
                    except KeyboardInterrupt:
                        console.log("Interrupted: finishing the scenes in progress ...")
                        for future in pending:
                            future.cancel()
                        for future in list(pending):
                            if not future.cancelled():
                                try:
                                    finished(*future.result(), progress)
                                except Exception:
                                    pass
                        raise
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)

    elapsed = time.perf_counter() - start
    sync_folder(out)
    timing = {
        "scenes_generated": len(scene_seconds),
        "workers": workers,
        "wall_seconds": round(elapsed, 2),
        "scenes_per_minute": round(60 * len(scene_seconds) / elapsed, 2)
        if elapsed > 0 and scene_seconds
        else 0.0,
        "seconds_per_scene_per_worker": round(sum(scene_seconds) / len(scene_seconds), 3)
        if scene_seconds
        else 0.0,
    }
    collection = build_index(out, config, done, timing)
    collection.save()
    if scene_seconds:
        console.log(
            f"{len(scene_seconds)} scenes in {elapsed:.1f} s with {workers} worker(s): "
            f"{timing['scenes_per_minute']} scenes/min, {timing['seconds_per_scene_per_worker']} s per scene per worker."
        )
    console.log(f"Index of {len(collection.scenes)} scenes: {out / INDEX_FILE}")
    if interrupted:
        missing = config.num_scenes - len(done)
        console.log(f"[yellow]Stopped with {missing} scene(s) missing; run the same command again to resume.")
        raise KeyboardInterrupt
    if failures:
        raise RuntimeError(
            f"{len(failures)} scene(s) failed (the others are written and indexed): "
            + "; ".join(failures[:5])
        )
    return collection


def build_index(
    out: Path,
    config: CollectionConfig,
    stats: Dict[int, Dict[str, Any]],
    timing: Optional[Dict[str, Any]] = None,
) -> SceneCollection:
    """The index of the finished scenes (in index order) with collection-wide statistics."""
    scene = config.scene
    entries = []
    for index in sorted(stats):
        name = scene_name(index)
        entries.append(
            SceneEntry(
                name=name,
                path=name,
                split=split_of(name, config.val_fraction, config.test_fraction),
                source="procedural",
                num_views=scene.num_views,
                image_size=(scene.height, scene.width),
                has_depth=True,
                has_labels=True,
                has_instances=True,
                has_labeled_points=True,
                stats=stats[index],
            )
        )
    statistics = collection_statistics(config, [stats[i] for i in sorted(stats)], [e.split for e in entries])
    if timing is not None:
        statistics["timing"] = timing
    return SceneCollection(root=out, scenes=entries, classes=dict(NYU40), statistics=statistics)


def _summary(values: List[float]) -> Dict[str, float]:
    if not values:
        return {}
    return {
        "min": round(min(values), 3),
        "mean": round(sum(values) / len(values), 3),
        "max": round(max(values), 3),
    }


def collection_statistics(
    config: CollectionConfig, stats: List[Dict[str, Any]], splits: List[str]
) -> Dict[str, Any]:
    """Collection-wide counts (deterministic) from the per-scene statistics."""
    shapes = Counter(s["room_shape"] for s in stats)
    room_types = Counter(t for s in stats for t in s["room_types"])
    objects = Counter()
    pixels = Counter()
    instances = Counter()
    scenes_with = Counter()
    photos = Counter()
    for s in stats:
        objects.update(s["objects"])
        instances.update(s["instances_per_class"])
        pixels.update({NYU40[int(k)]: v for k, v in s["class_pixels"].items()})
        scenes_with.update(s["visible_classes"])
        photos.update(s["photo_textures"])
    total_pixels = sum(pixels.values())
    classes = {
        name: {
            "scenes_visible": scenes_with.get(name, 0),
            "instances": instances.get(name, 0),
            "pixels": pixels.get(name, 0),
            "pixel_fraction": round(pixels.get(name, 0) / total_pixels, 6) if total_pixels else 0.0,
        }
        for name in NYU40.values()
        if instances.get(name, 0) or pixels.get(name, 0)
    }
    return {
        "generator": {
            "name": "splatsem_ns.data.procedural",
            "version": GENERATOR_VERSION,
            "seed": config.seed,
            "num_scenes": config.num_scenes,
            "val_fraction": config.val_fraction,
            "test_fraction": config.test_fraction,
            "settings": config.scene.to_record(),
        },
        "num_scenes_finished": len(stats),
        "splits": dict(sorted(Counter(splits).items())),
        "room_shapes": dict(sorted(shapes.items())),
        "room_types": dict(sorted(room_types.items())),
        "objects_per_scene": _summary([s["num_objects"] for s in stats]),
        "instances_per_scene": _summary([s["num_instances"] for s in stats]),
        "visible_classes_per_scene": _summary([len(s["visible_classes"]) for s in stats]),
        "floor_area_m2": _summary([s["floor_area_m2"] for s in stats]),
        "objects": dict(sorted(objects.items())),
        "classes": classes,
        "num_classes_visible": sum(1 for c in classes.values() if c["pixels"]),
        "rotated_instances": sum(s["rotated_instances"] for s in stats),
        "photo_textures": dict(sorted(photos.items())),
        "views": config.scene.num_views * len(stats),
        "layout_attempts": _summary([s["layout_attempts"] for s in stats]),
    }
