"""Appearance of procedural scenes: textures, materials, per-surface colours and lighting.

Textures come from two sources, all held in one mip-mapped atlas so that a view is shaded with a single
gather per lookup:

- **photographs shipped with scikit-image** (loaded offline from the package): brick, grass and gravel make
  walls, carpets and rugs; camera, coffee, astronaut, chelsea, rocket and moon are the content of pictures and
  screens; text and page are book covers, paper and whiteboards;
- **procedural patterns** (value noise, planks, tiles, checker, stripes, fabric, marble, wood grain, a view
  out of a window), generated once per process from a fixed seed, so they are the same in every worker.

A surface (one material of one object) picks a texture, a scale and two colours; grey textures mix the two
colours, colour photographs are tinted. Colours come from the material's palette pulled towards a per-class
tint, so classes keep a characteristic look across scenes while varying between them.

Shading is Lambertian (hemispherical ambient, one sun, soft point lights with distance falloff) plus an
emission term for screens, lamp shades and windows. It depends on the surface point and normal only, never on
the view, so every view of a scene is exactly consistent. Texture lookups pick a mip level from the pixel's
footprint, so distant textures do not alias at one sample per pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
from jaxtyping import Bool, Float, Int, UInt8
from PIL import Image

from splatsem_ns.data.procedural.primitives import SurfacePoints

PHOTOS: Tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "camera",
    "coffee",
    "astronaut",
    "chelsea",
    "rocket",
    "moon",
    "text",
    "page",
)
"""scikit-image's bundled photographs used as textures (``skimage.data.<name>()``, no network)."""
PATTERNS: Tuple[str, ...] = (
    "noise",
    "planks",
    "tiles",
    "checker",
    "stripes",
    "fabric",
    "marble",
    "woodgrain",
    "slats",
    "outdoor",
    "detail",
)
"""Procedural textures (tileable, 256 x 256)."""

_PATTERN_SEED = 20_241_121
"""Fixed seed of the procedural textures: they are part of the generator, not of a scene."""
_PHOTO_SIDE = 256
"""Longest side of the photographs at the finest mip level (screens and pictures are small in 320 x 256 views)."""
_DETAIL_SCALE = 0.35
"""Metres per repeat of the fine detail texture that modulates every surface (photometric texture everywhere)."""


# ----------------------------------------------------------------------------------------------------
# The texture bank


@dataclass
class TextureBank:
    """Every texture with its mip levels, in one flat RGB atlas."""

    names: Tuple[str, ...]
    is_photo: Bool[np.ndarray, " T"]
    """Whether the texture is one of scikit-image's photographs (for statistics)."""
    is_rgb: Bool[np.ndarray, " T"]
    """Colour texture (tinted) rather than grey (a mix of two colours)."""
    aspect: Float[np.ndarray, " T"]
    """Width / height of the texture's source image."""
    atlas: UInt8[np.ndarray, "N 3"]
    offset: Int[np.ndarray, "T L"]
    """Start of each mip level in the atlas (levels past a texture's last repeat its last)."""
    width: Int[np.ndarray, "T L"]
    height: Int[np.ndarray, "T L"]
    num_levels: Int[np.ndarray, " T"]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def sample(
        self,
        texture: Int[np.ndarray, " N"],
        u: Float[np.ndarray, " N"],
        v: Float[np.ndarray, " N"],
        level: Int[np.ndarray, " N"],
        wrap: Bool[np.ndarray, " N"],
    ) -> Float[np.ndarray, "N 3"]:
        """Nearest-texel lookup at (u, v) (1 = one image; v = 1 is the image's top row) in mip ``level``;
        ``wrap`` tiles the texture, otherwise coordinates are clamped to it."""
        key = texture * self.offset.shape[1] + np.minimum(level, self.num_levels[texture] - 1)
        w = self.width.reshape(-1)[key]
        h = self.height.reshape(-1)[key]
        fu = np.where(wrap, u - np.floor(u), np.clip(u, 0, 1))
        fv = np.where(wrap, v - np.floor(v), np.clip(v, 0, 1))
        x = np.minimum((fu * w).astype(np.int64), w - 1)
        y = np.minimum(((1 - fv) * h).astype(np.int64), h - 1)
        return self.atlas[self.offset.reshape(-1)[key] + y * w + x].astype(np.float32) * np.float32(
            1.0 / 255.0
        )


def _periodic_noise(rng: np.random.Generator, size: int, cells_x: int, cells_y: int) -> np.ndarray:
    """Tileable smooth value noise in [0, 1] of shape [size, size] on a cells_y x cells_x lattice."""
    lattice = rng.random((cells_y, cells_x))

    def axis_weights(cells: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.arange(size) * cells / size
        i0 = np.floor(x).astype(np.int64)
        f = x - i0
        return i0 % cells, (i0 + 1) % cells, f * f * (3 - 2 * f)

    x0, x1, fx = axis_weights(cells_x)
    y0, y1, fy = axis_weights(cells_y)
    rows = lattice[:, x0] * (1 - fx) + lattice[:, x1] * fx
    return rows[y0] * (1 - fy[:, None]) + rows[y1] * fy[:, None]


def _fractal(rng: np.random.Generator, size: int, base: int, octaves: int = 4) -> np.ndarray:
    total, norm = np.zeros((size, size)), 0.0
    for octave in range(octaves):
        amplitude = 0.5**octave
        cells = base * 2**octave
        total += amplitude * _periodic_noise(rng, size, cells, cells)
        norm += amplitude
    total /= norm
    return (total - total.min()) / max(float(total.max() - total.min()), 1e-9)


def _make_patterns(size: int = 256) -> Dict[str, np.ndarray]:
    """The procedural textures: grey [size, size] in [0, 1], except "outdoor" (RGB)."""
    rng = np.random.default_rng(_PATTERN_SEED)
    yy, xx = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
    out: Dict[str, np.ndarray] = {}
    out["noise"] = _fractal(rng, size, 4)
    out["detail"] = _fractal(rng, size, 16, octaves=3)

    # Planks: 8 rows, joints at a random offset per row, one tone per plank, grain along the plank.
    rows = 8
    row = np.floor(yy * rows).astype(np.int64)
    joint = rng.random(rows)
    along = np.mod(xx * 2 + joint[row], 1.0)
    plank = np.floor(np.mod(xx * 2 + joint[row], 2.0)).astype(np.int64) + 2 * row
    tone = rng.random(2 * rows + 2)[plank]
    grain = _periodic_noise(rng, size, 4, 64)
    planks = 0.55 * tone + 0.45 * grain
    gap = (np.mod(yy * rows, 1.0) < 0.04) | (along < 0.006)
    out["planks"] = np.where(gap, 0.0, 0.15 + 0.85 * planks)

    # Tiles: 4 x 4 with light grout and a slightly different tone per tile.
    cells = 4
    cell_tone = rng.random((cells, cells))[np.floor(yy * cells).astype(int), np.floor(xx * cells).astype(int)]
    grout = (np.mod(xx * cells, 1.0) < 0.04) | (np.mod(yy * cells, 1.0) < 0.04)
    out["tiles"] = np.where(grout, 1.0, 0.2 * cell_tone + 0.1 * _fractal(rng, size, 8))

    out["checker"] = 0.85 * ((np.floor(xx * 8) + np.floor(yy * 8)) % 2) + 0.15 * _fractal(rng, size, 8)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (8 * xx + 0.15 * _periodic_noise(rng, size, 4, 4)))
    out["stripes"] = 0.8 * stripes + 0.2 * _fractal(rng, size, 16)
    weave = 0.5 + 0.25 * (np.sin(2 * np.pi * 48 * xx) + np.sin(2 * np.pi * 48 * yy))
    out["fabric"] = 0.6 * weave + 0.4 * _fractal(rng, size, 8)
    turbulence = _fractal(rng, size, 4)
    out["marble"] = 0.5 + 0.5 * np.sin(2 * np.pi * (2 * xx + yy + 3.0 * turbulence))
    rings = np.mod(6 * yy + 3.0 * _periodic_noise(rng, size, 2, 8), 1.0)
    out["woodgrain"] = 0.6 * rings + 0.4 * _periodic_noise(rng, size, 4, 64)
    # Horizontal slats with a dark gap between them (blinds).
    out["slats"] = np.where(np.mod(yy * 16, 1.0) < 0.12, 0.0, 0.7 + 0.3 * np.mod(yy * 16, 1.0))

    # A view out of a window: sky with clouds, a tree line, a lawn (the grass photograph).
    sky_top, sky_horizon = np.array([0.30, 0.50, 0.85]), np.array([0.78, 0.86, 0.95])
    height = 1.0 - yy
    sky = sky_horizon + (sky_top - sky_horizon) * np.clip((height - 0.45) / 0.55, 0, 1)[..., None]
    clouds = np.clip((_fractal(rng, size, 4) - 0.55) * 3.0, 0, 1)[..., None]
    sky = sky * (1 - clouds) + clouds * 0.97
    trees = 0.38 + 0.12 * _periodic_noise(rng, size, 16, 1)[0][None, :]
    foliage = np.array([0.16, 0.32, 0.12]) * (0.6 + 0.8 * _fractal(rng, size, 16))[..., None]
    grass = _load_photo("grass").astype(np.float64)[..., None] / 255.0
    lawn = np.array([0.35, 0.55, 0.20]) * (0.5 + 0.8 * grass)
    out["outdoor"] = np.where(
        (height > trees)[..., None], sky, np.where((height > 0.28)[..., None], foliage, lawn)
    )
    return out


@cache
def _load_photo(name: str) -> UInt8[np.ndarray, "h w ..."]:
    """A scikit-image photograph, its longest side resized to ``_PHOTO_SIDE`` (PIL, deterministic)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    h, w = image.shape[:2]
    scale = _PHOTO_SIDE / max(h, w)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _mip_levels(image: Float[np.ndarray, "h w 3"]) -> List[np.ndarray]:
    """2 x 2 box-filtered levels down to a smallest side of 4 texels."""
    levels = [image]
    while min(levels[-1].shape[:2]) >= 8:
        top = levels[-1]
        h, w = top.shape[0] // 2 * 2, top.shape[1] // 2 * 2
        top = top[:h, :w]
        levels.append(0.25 * (top[0::2, 0::2] + top[1::2, 0::2] + top[0::2, 1::2] + top[1::2, 1::2]))
    return levels


@lru_cache(maxsize=1)
def texture_bank() -> TextureBank:
    """The texture bank (built once per process: about 0.3 s)."""
    images: List[Tuple[str, np.ndarray, bool]] = []
    for name in PHOTOS:
        photo = _load_photo(name).astype(np.float64) / 255.0
        images.append((name, photo, True))
    for name, pattern in _make_patterns().items():
        images.append((name, pattern, False))
    names, is_photo, is_rgb, aspect, chunks = [], [], [], [], []
    level_lists = []
    for name, image, photo in images:
        rgb = image.ndim == 3
        image3 = image if rgb else np.repeat(image[..., None], 3, axis=2)
        names.append(name)
        is_photo.append(photo)
        is_rgb.append(rgb)
        aspect.append(image.shape[1] / image.shape[0])
        level_lists.append(_mip_levels(image3))
    max_levels = max(len(levels) for levels in level_lists)
    offset = np.zeros((len(names), max_levels), dtype=np.int64)
    width = np.zeros_like(offset)
    height = np.zeros_like(offset)
    position = 0
    for t, levels in enumerate(level_lists):
        for lv in range(max_levels):
            image = levels[min(lv, len(levels) - 1)]
            if lv < len(levels):
                chunks.append(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).reshape(-1, 3))
                offset[t, lv] = position
                position += image.shape[0] * image.shape[1]
            else:
                offset[t, lv] = offset[t, lv - 1]
            height[t, lv], width[t, lv] = image.shape[:2]
    return TextureBank(
        names=tuple(names),
        is_photo=np.array(is_photo),
        is_rgb=np.array(is_rgb),
        aspect=np.array(aspect),
        atlas=np.concatenate(chunks),
        offset=offset,
        width=width,
        height=height,
        num_levels=np.array([len(levels) for levels in level_lists]),
    )


# ----------------------------------------------------------------------------------------------------
# Materials and surfaces


@dataclass(frozen=True)
class TextureChoice:
    """One way a material can look."""

    texture: str
    weight: float
    scale: Tuple[float, float] = (0.5, 1.5)
    """Range of metres per texture repeat (ignored by stretched textures)."""
    contrast: Tuple[float, float] = (0.2, 0.4)
    """Range of the relative difference between the two colours of a grey texture."""


@dataclass(frozen=True)
class Material:
    """How a kind of surface looks: candidate textures, a colour palette, and light behaviour."""

    choices: Tuple[TextureChoice, ...]
    palette: Tuple[Tuple[float, float, float], ...]
    jitter: float = 0.06
    """Per-channel uniform colour jitter."""
    fit: bool = False
    """Stretch the texture over each face (photos, screens, paper) instead of tiling it."""
    detail: float = 0.12
    """Amplitude of the fine detail modulation."""
    emission: float = 0.0
    """Fraction of the colour that does not depend on light (screens, lamp shades, the view out of windows)."""
    tint_weight: float = 0.3
    """How far the class tint pulls the palette colour."""


def _tc(texture: str, weight: float = 1.0, scale=(0.5, 1.5), contrast=(0.2, 0.4)) -> TextureChoice:
    return TextureChoice(texture, weight, scale, contrast)


_WHITES = ((0.92, 0.91, 0.88), (0.88, 0.87, 0.84), (0.95, 0.94, 0.92), (0.86, 0.88, 0.90))
_PASTELS = (
    (0.85, 0.80, 0.70),
    (0.78, 0.84, 0.78),
    (0.80, 0.82, 0.88),
    (0.88, 0.80, 0.78),
    (0.75, 0.72, 0.68),
)
_WOODS = ((0.55, 0.38, 0.22), (0.42, 0.28, 0.16), (0.68, 0.52, 0.34), (0.30, 0.20, 0.12), (0.75, 0.62, 0.45))
_FABRICS = (
    (0.62, 0.16, 0.15), (0.22, 0.32, 0.60), (0.35, 0.45, 0.35), (0.55, 0.52, 0.48),
    (0.25, 0.25, 0.28), (0.70, 0.60, 0.45), (0.45, 0.30, 0.50), (0.80, 0.75, 0.65),
)  # fmt: skip
_GREYS = ((0.60, 0.60, 0.62), (0.35, 0.35, 0.37), (0.15, 0.15, 0.16), (0.80, 0.80, 0.82))
_BRIGHT = ((0.80, 0.15, 0.12), (0.12, 0.35, 0.70), (0.15, 0.55, 0.25), (0.90, 0.70, 0.10), (0.55, 0.20, 0.55),
           (0.10, 0.10, 0.12), (0.85, 0.85, 0.80), (0.90, 0.45, 0.10))  # fmt: skip
_PHOTO_TINT = ((1.0, 1.0, 1.0), (1.0, 0.97, 0.92), (0.95, 0.97, 1.0))
_PICTURES = ("camera", "coffee", "astronaut", "chelsea", "rocket", "moon")

MATERIALS: Dict[str, Material] = {
    "wall_paint": Material(
        (
            _tc("noise", 4, (1.5, 3.0), (0.06, 0.15)),
            _tc("stripes", 1, (0.6, 1.2), (0.08, 0.2)),
            _tc("brick", 1.5, (1.0, 2.0), (0.35, 0.6)),
            _tc("gravel", 0.6, (0.8, 1.5), (0.1, 0.2)),
            _tc("marble", 0.4, (1.5, 3.0), (0.05, 0.12)),
        ),
        _WHITES + _PASTELS,
        tint_weight=0.0,
    ),
    "floor_wood": Material(
        (_tc("planks", 3, (1.5, 3.0), (0.3, 0.55)), _tc("woodgrain", 1, (1.0, 2.0), (0.2, 0.4))),
        _WOODS,
        tint_weight=0,
    ),
    "floor_tile": Material(
        (
            _tc("tiles", 2, (1.0, 2.4), (0.3, 0.6)),
            _tc("checker", 0.7, (1.2, 2.4), (0.3, 0.7)),
            _tc("marble", 1, (1.0, 2.0), (0.15, 0.3)),
            _tc("gravel", 0.7, (0.8, 1.5), (0.25, 0.45)),
        ),
        _WHITES + _GREYS[:2] + ((0.70, 0.62, 0.52),),
        tint_weight=0,
    ),
    "carpet": Material(
        (
            _tc("grass", 1, (0.6, 1.2), (0.25, 0.45)),
            _tc("gravel", 1, (0.6, 1.2), (0.25, 0.45)),
            _tc("fabric", 1, (0.3, 0.6), (0.2, 0.35)),
            _tc("noise", 1, (0.8, 1.5), (0.2, 0.4)),
        ),
        _FABRICS,
        tint_weight=0,
    ),
    "ceiling": Material((_tc("noise", 1, (2.0, 3.0), (0.04, 0.1)),), _WHITES, detail=0.06, tint_weight=0),
    "wood": Material(
        (
            _tc("woodgrain", 2, (0.6, 1.2), (0.2, 0.4)),
            _tc("planks", 1, (0.8, 1.6), (0.2, 0.35)),
            _tc("noise", 1, (0.5, 1.0), (0.15, 0.3)),
        ),
        _WOODS,
    ),
    "painted": Material(
        (_tc("noise", 2, (0.8, 1.5), (0.06, 0.15)), _tc("woodgrain", 1, (0.6, 1.2), (0.05, 0.12))),
        _WHITES + _GREYS + _PASTELS,
    ),
    "fabric": Material(
        (
            _tc("fabric", 2, (0.3, 0.7), (0.2, 0.35)),
            _tc("stripes", 1, (0.4, 0.9), (0.2, 0.45)),
            _tc("noise", 1, (0.4, 0.8), (0.2, 0.4)),
            _tc("grass", 0.5, (0.4, 0.8), (0.15, 0.3)),
            _tc("checker", 0.3, (0.3, 0.6), (0.2, 0.4)),
        ),
        _FABRICS,
    ),
    "leather": Material(
        (_tc("noise", 1, (0.3, 0.6), (0.15, 0.3)), _tc("gravel", 1, (0.3, 0.6), (0.1, 0.2))),
        _WOODS + _GREYS[2:3],
    ),
    "metal": Material((_tc("noise", 1, (0.5, 1.0), (0.05, 0.15)),), _GREYS, detail=0.05),
    "stone": Material(
        (
            _tc("marble", 2, (0.6, 1.2), (0.1, 0.3)),
            _tc("gravel", 1, (0.4, 0.8), (0.15, 0.3)),
            _tc("noise", 1, (0.4, 0.8), (0.1, 0.2)),
        ),
        _WHITES + _GREYS + ((0.45, 0.40, 0.35),),
        tint_weight=0,
    ),
    "blinds": Material((_tc("slats", 1, (0.3, 0.5), (0.2, 0.4)),), _WHITES + _PASTELS, detail=0.03),
    "screen_off": Material(
        (_tc("noise", 1, (0.5, 1.0), (0.05, 0.1)),),
        ((0.04, 0.04, 0.05),),
        jitter=0.01,
        detail=0.02,
        tint_weight=0,
    ),
    "ceramic": Material((_tc("noise", 1, (0.8, 1.5), (0.03, 0.08)),), _WHITES, detail=0.04, tint_weight=0.1),
    "appliance": Material((_tc("noise", 1, (0.8, 1.5), (0.03, 0.08)),), _WHITES + _GREYS[:1], detail=0.04),
    "glass_outdoor": Material(
        (_tc("outdoor", 3), _tc("rocket", 1)),
        _PHOTO_TINT,
        jitter=0.02,
        fit=True,
        emission=0.75,
        tint_weight=0,
    ),
    "photo": Material(
        tuple(_tc(name) for name in _PICTURES), _PHOTO_TINT, jitter=0.03, fit=True, detail=0.03, tint_weight=0
    ),
    "screen": Material(
        tuple(_tc(name) for name in _PICTURES),
        _PHOTO_TINT,
        jitter=0.02,
        fit=True,
        detail=0.0,
        emission=0.7,
        tint_weight=0,
    ),
    "paper": Material(
        (_tc("page", 1, contrast=(0.6, 0.8)), _tc("text", 1, contrast=(0.6, 0.8))),
        _WHITES,
        jitter=0.02,
        fit=True,
    ),
    "book": Material(
        (
            _tc("text", 1, (0.15, 0.3), (0.2, 0.4)),
            _tc("noise", 1, (0.2, 0.4), (0.1, 0.3)),
            _tc("stripes", 0.5, (0.1, 0.2)),
        ),
        _BRIGHT,
        jitter=0.1,
    ),
    "cardboard": Material(
        (_tc("noise", 1, (0.3, 0.6), (0.1, 0.25)), _tc("gravel", 0.5, (0.4, 0.8), (0.08, 0.15))),
        ((0.62, 0.46, 0.30), (0.70, 0.55, 0.38), (0.55, 0.40, 0.26)),
        tint_weight=0,
    ),
    "plant": Material(
        (_tc("grass", 1, (0.2, 0.4), (0.4, 0.7)),), ((0.20, 0.45, 0.18), (0.28, 0.50, 0.20)), tint_weight=0
    ),
    "terracotta": Material(
        (_tc("noise", 1, (0.3, 0.5), (0.1, 0.2)),), ((0.70, 0.38, 0.24), (0.55, 0.30, 0.22))
    ),
    "whiteboard": Material(
        (_tc("text", 1, contrast=(0.15, 0.3)),), _WHITES, jitter=0.01, fit=True, detail=0.02
    ),
    "mirror": Material(
        (_tc("marble", 1, (0.8, 1.5), (0.1, 0.2)),), ((0.70, 0.78, 0.82), (0.62, 0.70, 0.76)), detail=0.03
    ),
    "curtain": Material(
        (_tc("stripes", 2, (0.25, 0.5), (0.25, 0.45)), _tc("fabric", 1, (0.3, 0.6), (0.2, 0.35))),
        _FABRICS + _PASTELS,
    ),
    "towel": Material(
        (_tc("fabric", 1, (0.2, 0.4), (0.2, 0.35)), _tc("stripes", 1, (0.2, 0.4), (0.3, 0.5))),
        _FABRICS + _WHITES,
    ),
    "lampshade": Material(
        (_tc("fabric", 1, (0.2, 0.4), (0.1, 0.2)), _tc("noise", 1, (0.3, 0.6), (0.05, 0.15))),
        ((0.95, 0.90, 0.75), (0.92, 0.88, 0.80), (0.85, 0.80, 0.65)),
        emission=0.35,
    ),
    "plastic": Material((_tc("noise", 1, (0.4, 0.8), (0.05, 0.12)),), _BRIGHT + _GREYS),
}
"""Materials by name. Catalogue parts name one, optionally with a ``#variant`` suffix (``"book#3"``): parts of
one instance with the same full name share a surface, different variants get their own colours."""

CLASS_TINTS: Dict[str, Tuple[float, float, float]] = {
    "bed": (0.35, 0.45, 0.70),
    "sofa": (0.65, 0.25, 0.20),
    "chair": (0.30, 0.35, 0.55),
    "table": (0.50, 0.35, 0.20),
    "desk": (0.45, 0.40, 0.35),
    "cabinet": (0.55, 0.50, 0.42),
    "dresser": (0.50, 0.36, 0.25),
    "night stand": (0.48, 0.34, 0.22),
    "bookshelf": (0.45, 0.32, 0.20),
    "shelves": (0.60, 0.55, 0.50),
    "counter": (0.50, 0.50, 0.52),
    "refrigerator": (0.90, 0.90, 0.92),
    "television": (0.10, 0.10, 0.12),
    "toilet": (0.95, 0.95, 0.95),
    "sink": (0.90, 0.90, 0.92),
    "bathtub": (0.94, 0.94, 0.94),
    "pillow": (0.85, 0.80, 0.70),
    "curtain": (0.70, 0.55, 0.45),
    "door": (0.60, 0.45, 0.30),
    "window": (0.85, 0.85, 0.85),
    "lamp": (0.90, 0.84, 0.55),
    "box": (0.65, 0.50, 0.32),
    "towel": (0.40, 0.60, 0.75),
    "floor mat": (0.50, 0.35, 0.40),
    "bag": (0.30, 0.25, 0.20),
}
"""Per-class hue that a surface's palette colour is pulled towards (by its material's ``tint_weight``)."""


@dataclass
class SurfaceTable:
    """Every surface of a scene: what it is (class, instance) and how it looks."""

    label: List[int] = field(default_factory=list)
    """NYU40 class id."""
    instance: List[int] = field(default_factory=list)
    texture: List[int] = field(default_factory=list)
    scale: List[float] = field(default_factory=list)
    """Metres per texture repeat (tiled textures)."""
    fit: List[bool] = field(default_factory=list)
    offset: List[Tuple[float, float]] = field(default_factory=list)
    color_a: List[Tuple[float, float, float]] = field(default_factory=list)
    color_b: List[Tuple[float, float, float]] = field(default_factory=list)
    detail: List[float] = field(default_factory=list)
    emission: List[float] = field(default_factory=list)
    material: List[str] = field(default_factory=list)

    def arrays(self) -> "SurfaceArrays":
        return SurfaceArrays(
            label=np.array(self.label, dtype=np.int64),
            instance=np.array(self.instance, dtype=np.int64),
            texture=np.array(self.texture, dtype=np.int64),
            scale=np.array(self.scale, dtype=np.float64),
            fit=np.array(self.fit, dtype=bool),
            offset=np.array(self.offset, dtype=np.float64).reshape(-1, 2),
            color_a=np.array(self.color_a, dtype=np.float32).reshape(-1, 3),
            color_b=np.array(self.color_b, dtype=np.float32).reshape(-1, 3),
            detail=np.array(self.detail, dtype=np.float32),
            emission=np.array(self.emission, dtype=np.float32),
        )


@dataclass
class SurfaceArrays:
    """``SurfaceTable`` as arrays (one row per surface) for vectorised shading."""

    label: Int[np.ndarray, " S"]
    instance: Int[np.ndarray, " S"]
    texture: Int[np.ndarray, " S"]
    scale: Float[np.ndarray, " S"]
    fit: Bool[np.ndarray, " S"]
    offset: Float[np.ndarray, "S 2"]
    color_a: Float[np.ndarray, "S 3"]
    color_b: Float[np.ndarray, "S 3"]
    detail: Float[np.ndarray, " S"]
    emission: Float[np.ndarray, " S"]


class SurfaceFactory:
    """Creates surfaces with seeded random looks.

    A *look* (texture, scale, colours) is drawn once per look key; a *surface* is one row per (instance, look
    key), so the matching chairs of a dining set share a look while each stays its own instance, and a room's
    walls look alike while each wall is its own instance.
    """

    def __init__(self, rng: np.random.Generator, bank: Optional[TextureBank] = None) -> None:
        self.rng = rng
        self.bank = bank or texture_bank()
        self.table = SurfaceTable()
        self._looks: Dict[object, Tuple] = {}
        self._rows: Dict[Tuple[int, object], int] = {}

    def surface(self, label: int, class_name: str, instance: int, material: str, look: object = None) -> int:
        """Index of the surface of ``instance`` (class ``label``/``class_name``) made of ``material``
        (``name``, ``name#variant`` or ``name:texture``), looking like every other surface of the same ``look``
        key (default: its own)."""
        look = (instance, material) if look is None else look
        key = (instance, look)
        if key in self._rows:
            return self._rows[key]
        if look not in self._looks:
            self._looks[look] = self._draw_look(class_name, material)
        texture, scale, fit, offset, color_a, color_b, detail, emission = self._looks[look]
        t = self.table
        t.label.append(label)
        t.instance.append(instance)
        t.texture.append(texture)
        t.scale.append(scale)
        t.fit.append(fit)
        t.offset.append(offset)
        t.color_a.append(color_a)
        t.color_b.append(color_b)
        t.detail.append(detail)
        t.emission.append(emission)
        t.material.append(material)
        self._rows[key] = len(t.label) - 1
        return self._rows[key]

    def _draw_look(self, class_name: str, material: str) -> Tuple:
        name, _, forced = material.partition(":")
        spec = MATERIALS[name.split("#")[0]]
        rng = self.rng
        weights = np.array([c.weight for c in spec.choices])
        choice = spec.choices[int(rng.choice(len(spec.choices), p=weights / weights.sum()))]
        if forced:
            # The model chose the image (a picture's frame follows the photo's proportions).
            choice = next(c for c in spec.choices if c.texture == forced)
        texture = self.bank.index(choice.texture)
        base = np.asarray(spec.palette[int(rng.integers(len(spec.palette)))], dtype=np.float64)
        tint = CLASS_TINTS.get(class_name)
        if tint is not None and spec.tint_weight > 0:
            base = base + spec.tint_weight * (np.asarray(tint) - base)
        base = np.clip(base + rng.uniform(-spec.jitter, spec.jitter, 3), 0.03, 0.97)
        if self.bank.is_rgb[texture]:
            # Colour photos: tinted, not recoloured.
            color_a, color_b = np.zeros(3), base
        elif spec.fit:
            # Grey photos stretched over a face (black-and-white prints, pages): from dark to the base colour.
            color_a, color_b = base * rng.uniform(0.05, 0.25), base
        else:
            contrast = rng.uniform(*choice.contrast) * rng.choice([-1.0, 1.0])
            color_a = base
            color_b = np.clip(base * (1.0 + contrast) + rng.uniform(-0.03, 0.03, 3), 0.02, 0.98)
        return (
            texture,
            float(rng.uniform(*choice.scale)),
            spec.fit,
            (float(rng.random()), float(rng.random())),
            tuple(float(x) for x in color_a),
            tuple(float(x) for x in color_b),
            spec.detail,
            spec.emission,
        )


# ----------------------------------------------------------------------------------------------------
# Lighting and shading


def kelvin_to_rgb(kelvin: float) -> Float[np.ndarray, " 3"]:
    """Approximate colour of a black body (Tanner Helland's fit), normalised to a maximum of 1."""
    t = kelvin / 100.0
    r = 1.0 if t <= 66 else min(1.0, 1.292936 * (t - 60) ** -0.1332047592)
    g = 0.390081578 * math.log(t) - 0.631841443 if t <= 66 else 1.129890861 * (t - 60) ** -0.0755148492
    b = 1.0 if t >= 66 else (0.0 if t <= 19 else 0.543206789 * math.log(t - 10) - 1.196254089)
    rgb = np.clip(np.array([r, g, b]), 0.0, 1.0)
    return rgb / rgb.max()


@dataclass
class Lighting:
    """View-independent lighting of one scene."""

    sky_ambient: Float[np.ndarray, " 3"]
    """Ambient light from above (surfaces facing up get all of it, facing down none)."""
    ground_ambient: Float[np.ndarray, " 3"]
    """Ambient light from below."""
    sun_direction: Float[np.ndarray, " 3"]
    """Unit vector towards the sun (a directional key light)."""
    sun_color: Float[np.ndarray, " 3"]
    """Colour times intensity of the sun."""
    light_positions: Float[np.ndarray, "K 3"]
    light_colors: Float[np.ndarray, "K 3"]
    light_ranges: Float[np.ndarray, " K"]
    """Distance at which a point light's intensity halves (soft falloff 1 / (1 + (d / range)^2))."""

    def irradiance(self, points: Float[np.ndarray, "N 3"], normals: Float[np.ndarray, "N 3"]) -> np.ndarray:
        """Light arriving at each point [N, 3] (float32)."""
        f32 = np.float32
        nx, ny, nz = (normals[:, i].astype(f32) for i in range(3))
        up = (0.5 + 0.5 * nz)[:, None]
        light = self.ground_ambient.astype(f32) + up * (self.sky_ambient - self.ground_ambient).astype(f32)
        sun = self.sun_direction.astype(f32)
        light += np.maximum(nx * sun[0] + ny * sun[1] + nz * sun[2], 0)[:, None] * self.sun_color.astype(f32)
        px, py, pz = (points[:, i].astype(f32) for i in range(3))
        for position, color, reach in zip(
            self.light_positions, self.light_colors, self.light_ranges, strict=True
        ):
            dx, dy, dz = f32(position[0]) - px, f32(position[1]) - py, f32(position[2]) - pz
            d2 = dx * dx + dy * dy + dz * dz
            cosine = np.maximum(nx * dx + ny * dy + nz * dz, 0) / np.sqrt(np.maximum(d2, f32(1e-12)))
            # Soft falloff 1 / (1 + (d / reach)^2).
            weight = cosine / (1 + d2 * f32(1.0 / reach**2))
            light += weight[:, None] * color.astype(f32)
        return light

    def describe(self) -> Dict[str, object]:
        return {
            "ambient": round(float(self.sky_ambient.mean()), 3),
            "sun_elevation_deg": round(math.degrees(math.asin(float(self.sun_direction[2]))), 1),
            "point_lights": int(self.light_positions.shape[0]),
        }


def random_lighting(
    rng: np.random.Generator, light_positions: Float[np.ndarray, "K 3"]
) -> Tuple[Lighting, Dict[str, float]]:
    """A random lighting: ambient level, sun direction and colour temperature, warm point lights at
    ``light_positions``. Returns it and its parameters for statistics."""
    ambient_level = rng.uniform(0.35, 0.62)
    sky_tint = kelvin_to_rgb(rng.uniform(5500, 9000))
    sky = ambient_level * sky_tint
    ground = ambient_level * rng.uniform(0.55, 0.8) * kelvin_to_rgb(rng.uniform(3500, 6000))
    azimuth = rng.uniform(0, 2 * math.pi)
    elevation = math.radians(rng.uniform(15, 65))
    sun_direction = np.array(
        [
            math.cos(elevation) * math.cos(azimuth),
            math.cos(elevation) * math.sin(azimuth),
            math.sin(elevation),
        ]
    )
    sun_kelvin = rng.uniform(3000, 7000)
    sun = rng.uniform(0.15, 0.45) * kelvin_to_rgb(sun_kelvin)
    k = light_positions.shape[0]
    kelvins = rng.uniform(2700, 4500, k)
    colors = (
        np.stack([kelvin_to_rgb(x) for x in kelvins]) * rng.uniform(0.25, 0.55, (k, 1))
        if k
        else np.zeros((0, 3))
    )
    lighting = Lighting(
        sky_ambient=sky,
        ground_ambient=ground,
        sun_direction=sun_direction,
        sun_color=sun,
        light_positions=np.asarray(light_positions, dtype=np.float64).reshape(-1, 3),
        light_colors=colors,
        light_ranges=rng.uniform(1.8, 3.5, k),
    )
    params = {
        "ambient": round(float(ambient_level), 3),
        "sun_kelvin": round(float(sun_kelvin)),
        "sun_elevation_deg": round(math.degrees(elevation), 1),
        "point_lights": int(k),
    }
    return lighting, params


def shade(
    bank: TextureBank,
    surfaces: SurfaceArrays,
    lighting: Lighting,
    hits: SurfacePoints,
    footprint: Float[np.ndarray, " N"],
) -> Float[np.ndarray, "N 3"]:
    """Colour in [0, 1] (float32) of surface points seen with the given pixel footprint (metres per pixel)."""
    f32 = np.float32
    s = hits.surface
    texture = surfaces.texture[s]
    fit = surfaces.fit[s]
    scale = surfaces.scale[s].astype(f32)
    footprint = footprint.astype(f32)
    w0 = bank.width[texture, 0].astype(f32)
    # Texels per metre: a tiled texture's repeat length, or the face a stretched texture covers.
    density = w0 / np.where(fit, np.maximum(hits.face_size[:, 0], f32(1e-3)), scale)
    level = np.clip(np.round(np.log2(np.maximum(footprint * density, 1))), 0, 15).astype(np.int64)
    offset = surfaces.offset[s].astype(f32)
    u = np.where(fit, hits.uv_fit[:, 0], hits.uv[:, 0] / scale + offset[:, 0])
    v = np.where(fit, hits.uv_fit[:, 1], hits.uv[:, 1] / scale + offset[:, 1])
    value = bank.sample(texture, u, v, level, ~fit)
    color_a = surfaces.color_a[s]
    albedo = color_a + (surfaces.color_b[s] - color_a) * value

    detail_tex = bank.index("detail")
    d_density = f32(bank.width[detail_tex, 0] / _DETAIL_SCALE)
    d_level = np.clip(np.round(np.log2(np.maximum(footprint * d_density, 1))), 0, 15).astype(np.int64)
    du = hits.uv[:, 0] * f32(1 / _DETAIL_SCALE) + 7 * offset[:, 0]
    dv = hits.uv[:, 1] * f32(1 / _DETAIL_SCALE) + 7 * offset[:, 1]
    n = s.shape[0]
    detail = bank.sample(np.full(n, detail_tex), du, dv, d_level, np.ones(n, dtype=bool))[:, 0]
    albedo *= (1 + 2 * surfaces.detail[s] * (detail - f32(0.5)))[:, None]

    emission = surfaces.emission[s][:, None]
    light = lighting.irradiance(hits.points, hits.normals)
    return np.clip(albedo * ((1 - emission) * light + emission), 0, 1)
