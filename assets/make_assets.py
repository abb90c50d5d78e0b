"""Make the README's pictures (small PNGs in this folder) with the package's own code.

    python assets/make_assets.py scenes   # generated_scenes.png: procedural scenes with their depth and labels
    python assets/make_assets.py query    # query_panel.png: the viewer's query panel at work on a trained room
    python assets/make_assets.py prediction --config RUN/config.yml
                                          # semantic_splat_prediction.png: a trained semantic-splat run's prediction
                                          # for a held-out scene: context views, predicted depth, a novel view and
                                          # a relevancy map

``query`` trains chorus-splat on the synthetic room with the labels proxy teachers on the CPU (a few minutes),
then sets the controls of the query panel that ns-viewer shows (``SemanticQueryPanel``) and renders a held-out
view through the same output hook the viewer calls: what the panel's "query" output displays, without the
browser around it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Sequence

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
TILE = (160, 120)
"""(width, height) of one picture in a grid."""


def _tile(array: np.ndarray, caption: str) -> Image.Image:
    """An image (uint8 RGB or float in [0, 1]) resized to ``TILE`` with a caption strip below."""
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    image = Image.fromarray(array).convert("RGB").resize(TILE, Image.BILINEAR)
    canvas = Image.new("RGB", (TILE[0], TILE[1] + 16), "white")
    canvas.paste(image, (0, 0))
    ImageDraw.Draw(canvas).text((4, TILE[1] + 2), caption, fill="black")
    return canvas


def _grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    width = max(len(r) for r in rows) * (TILE[0] + 4)
    height = len(rows) * (TILE[1] + 20)
    canvas = Image.new("RGB", (width, height), "white")
    for y, row in enumerate(rows):
        for x, tile in enumerate(row):
            canvas.paste(tile, (x * (TILE[0] + 4), y * (TILE[1] + 20)))
    return canvas


def label_colours(labels: np.ndarray) -> np.ndarray:
    """A fixed colour per class id (0: black)."""
    palette = np.random.default_rng(7).integers(40, 230, size=(256, 3)).astype(np.uint8)
    palette[0] = 0
    return palette[labels % 256]


def depth_colours(depth: np.ndarray) -> np.ndarray:
    """Depth in turbo-like colours (near: red, far: blue); 0 (no measurement) is black."""
    import matplotlib

    valid = depth > 0
    scaled = np.zeros_like(depth, dtype=np.float64)
    if valid.any():
        lo, hi = np.percentile(depth[valid], [2, 98])
        scaled = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    colours = matplotlib.colormaps["turbo"](1.0 - scaled)[..., :3]
    colours[~valid] = 0
    return (colours * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ scenes


def make_scenes(out: Path, count: int = 4) -> Path:
    """A grid: for each of ``count`` generated scenes, two views with the depth and labels of the first."""
    from splatsem_ns.data.procedural.generate import CollectionConfig, generate_collection
    from splatsem_ns.data.procedural.scene import ProceduralSceneConfig
    from splatsem_ns.data.scene_frames import SceneFrames

    with tempfile.TemporaryDirectory() as tmp:
        scene = ProceduralSceneConfig(num_views=12, width=320, height=240)
        collection = generate_collection(
            Path(tmp) / "collection", CollectionConfig(num_scenes=count, seed=11, workers=1, scene=scene)
        )
        rows: List[List[Image.Image]] = []
        for entry in collection.scenes:
            frames = SceneFrames.load(collection.scene_path(entry))
            first = frames.load_view(0, (120, 160))
            second = frames.load_view(len(frames) // 2, (120, 160))
            shape = entry.stats.get("room_shape") or entry.stats.get("shape") or ""
            rows.append(
                [
                    _tile(first.image, f"{entry.name} ({shape})"),
                    _tile(depth_colours(first.depth), "depth"),
                    _tile(label_colours(first.labels), "classes"),
                    _tile(label_colours(first.instances * 37), "instances"),
                    _tile(second.image, "another view"),
                ]
            )
        path = out / "generated_scenes.png"
        _grid(rows).save(path, optimize=True)
    return path


# ------------------------------------------------------------------------------------------- query


def _train_room(root: Path, iterations: int) -> Path:
    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    scene = generate_synthetic_scene(
        root / "scene", SyntheticSceneConfig(num_views=24, width=160, height=120)
    ).parent
    ns_train = str(Path(sys.executable).with_name("ns-train"))
    subprocess.run(
        [
            ns_train, "chorus-splat", "--data", str(scene), "--output-dir", str(root / "out"),
            "--experiment-name", "room", "--timestamp", "run", "--max-num-iterations", str(iterations),
            "--vis", "tensorboard", "--machine.device-type", "cpu", "--viewer.quit-on-train-completion", "True",
            "--steps-per-eval-image", "100000", "--steps-per-eval-all-images", "100000",
            "--pipeline.datamanager.teachers", "labels", "labels-instance",
            "--pipeline.datamanager.feature-cache-dir", str(root / "cache"),
        ],
        check=True,
    )  # fmt: skip
    return root / "out" / "room" / "chorus-splat" / "run" / "config.yml"


def _panel_output(pipeline, camera, **controls) -> np.ndarray:
    """The panel's "query" output for one camera, with its controls set as a user would in the viewer."""
    import torch

    from splatsem_ns.viewer.query_panel import QUERY_OUTPUT

    panel = pipeline.semantic_query
    for name, value in controls.items():
        getattr(panel, name).value = value
    with torch.no_grad():
        outputs = pipeline.model.get_outputs_for_camera(camera)
    if QUERY_OUTPUT not in outputs:
        raise RuntimeError(f"the panel gave no output: {panel.last_message}")
    return outputs[QUERY_OUTPUT].cpu().numpy()


def make_query(out: Path, iterations: int = 1500, config: Path | None = None) -> Path:
    """RGB, relevancy of two queries, segmentation and PCA of a held-out view of the trained synthetic room."""
    import torch
    from nerfstudio.utils.eval_utils import eval_setup

    import splatsem_ns.method_configs.chorus_splat  # noqa: F401 (allow-lists the checkpoint's numpy scalars)

    with tempfile.TemporaryDirectory() as tmp:
        config = config or _train_room(Path(tmp), iterations)
        _, pipeline, _, _ = eval_setup(config, test_mode="test")
        camera = pipeline.datamanager.eval_dataset.cameras[0:1].to(pipeline.device)
        with torch.no_grad():
            rgb = pipeline.model.get_outputs_for_camera(camera)["rgb"].cpu().numpy()
        tiles = [_tile(rgb, "held-out view")]
        for text in ("sofa", "lamp"):
            image = _panel_output(pipeline, camera, positives=text, display="relevancy", threshold=0.9)
            tiles.append(_tile(image, f'relevancy: "{text}"'))
        tiles.append(
            _tile(_panel_output(pipeline, camera, positives="", display="segmentation"), "segmentation")
        )
        tiles.append(_tile(_panel_output(pipeline, camera, display="pca"), "PCA of features"))
        path = out / "query_panel.png"
        _grid([tiles]).save(path, optimize=True)
    return path


# -------------------------------------------------------------------------------------- prediction

STRUCTURE = ("wall", "floor", "ceiling")
"""Classes not chosen as the prediction picture's query (they cover most of every view)."""
NEGATIVES = ("object", "things", "stuff", "texture")
"""LERF's canonical negative queries."""


def make_prediction(out: Path, pipeline) -> Path:
    """One row for the first held-out scene of a semantic-splat pipeline: the two context views, the predicted depth
    of the first, the prediction rendered at a target view the network never saw, that view's real image, and the
    relevancy of the object class that covers most of the target view (decoded from the rendered latent)."""
    import torch

    from splatsem_ns.evaluation.protocol import class_queries
    from splatsem_ns.models.relevancy import lerf_relevancy
    from splatsem_ns.pipelines.semantic_splat_pipeline import _to_batch

    dataset = pipeline.datamanager.eval_dataset or pipeline.datamanager.train_dataset
    model = pipeline.model
    pipeline.eval()
    batch = _to_batch(dataset[0], model.device)
    with torch.no_grad():
        outputs = model(batch)
    context, target = batch["context"], batch["target"]
    rendered = outputs["rendered"]
    tiles = [_tile(context["images"][0, v].cpu().numpy(), f"context {v + 1}") for v in range(2)]
    depth = outputs["gaussians"].depth[0, 0].float().cpu().numpy()
    tiles.append(_tile(depth_colours(depth), "predicted depth 1"))
    tiles.append(_tile(rendered.rgb[0, 0].cpu().numpy(), "novel view (predicted)"))
    tiles.append(_tile(target["images"][0, 0].cpu().numpy(), "novel view (real)"))
    teacher = next((n for n, s in model.teacher_specs.items() if s.has_text_encoder), None)
    labels = target["labels"][0, 0].cpu().numpy()
    classes = pipeline.datamanager.collection.classes
    ids, names = class_queries(classes)
    counts = {name: int((labels == i).sum()) for i, name in zip(ids, names, strict=True)}
    query = max((n for n in counts if n not in STRUCTURE), key=lambda n: counts[n], default=None)
    if teacher is not None and query is not None:
        text = model.teacher_specs[teacher].config.setup().to(model.device).eval()
        with torch.no_grad():
            features = model.projector_heads[teacher](rendered.latent[0, 0])
            relevancy = lerf_relevancy(
                features, text.encode_text([query]).float(), text.encode_text(list(NEGATIVES)).float()
            )[..., 0]
        import matplotlib

        heat = matplotlib.colormaps["turbo"](relevancy.clamp(0, 1).cpu().numpy())[..., :3]
        tiles.append(_tile(heat, f'relevancy: "{query}"'))
    path = out / "semantic_splat_prediction.png"
    _grid([tiles]).save(path, optimize=True)
    return path


def _prediction_from_run(out: Path, config: Path) -> Path:
    from nerfstudio.utils.eval_utils import eval_setup

    import splatsem_ns.method_configs.semantic_splat  # noqa: F401 (allow-lists the checkpoint's numpy scalars)

    _, pipeline, _, _ = eval_setup(config, test_mode="test")
    return make_prediction(out, pipeline)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("scenes", "query", "prediction"))
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--iterations", type=int, default=1500, help="training steps of the query picture")
    parser.add_argument(
        "--config",
        type=Path,
        help="query: use this trained chorus-splat run's config.yml instead; prediction: the semantic-splat run",
    )
    args = parser.parse_args(argv)
    if args.what == "scenes":
        path = make_scenes(args.out)
    elif args.what == "query":
        path = make_query(args.out, args.iterations, args.config)
    else:
        if args.config is None:
            parser.error("prediction needs --config RUN/config.yml of a trained semantic-splat run")
        path = _prediction_from_run(args.out, args.config)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
