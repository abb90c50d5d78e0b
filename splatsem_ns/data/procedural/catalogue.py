"""The furniture catalogue: indoor objects composed of several primitives, with NYU40 class names.

Every model is built in its own frame: x to its right, y towards its front (the side one uses), z up, the floor
at z = 0 and the footprint roughly centred on the origin. Parts carry a class name, a sub-instance number
(parts with the same number are one object instance: a bed's frame, mattress and headboard are one ``bed``,
each of its pillows is its own ``pillow``) and a material name (see ``appearance.MATERIALS``). Group models
(a dining set, a desk with its chair, a bed with night stands) are merged from smaller ones.

Sizes are drawn from plausible ranges (metres); a builder takes the random generator and a ``BuildContext``
(ceiling height, length of wall available) and never draws anything else, so a scene's layout is a function of
its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from jaxtyping import Float

from splatsem_ns.data.procedural.primitives import BOX, CYLINDER, ELLIPSOID, rotate_z

PHOTO_ASPECT: Dict[str, float] = {
    "camera": 1.0,
    "coffee": 1.5,
    "astronaut": 1.0,
    "chelsea": 451 / 300,
    "rocket": 640 / 427,
    "moon": 1.0,
}
"""Width / height of the scikit-image photographs hung as pictures (so prints keep their proportions)."""


@dataclass
class Part:
    """One primitive of a model, in the model's frame."""

    kind: int
    center: Float[np.ndarray, " 3"]
    half: Float[np.ndarray, " 3"]
    yaw: float
    label: str
    """NYU40 class name."""
    sub: int
    """Sub-instance within the model: parts with the same number form one object instance."""
    material: str


@dataclass
class TopSurface:
    """A horizontal rectangle small objects can be put on (a desk's top), in the model's frame."""

    center: Float[np.ndarray, " 2"]
    half: Float[np.ndarray, " 2"]
    z: float
    host: str
    """Class name of the object it belongs to (decides what goes on it)."""
    headroom: float = 0.6
    """Height available above it inside the model (upper kitchen cabinets, shelves above)."""


@dataclass
class BuildContext:
    """What a builder may depend on besides the random generator."""

    ceiling: float
    """Room height, metres."""
    max_length: float = 3.0
    """Longest wall stretch available (counters and bathtubs adapt their length to it)."""
    room_size: Tuple[float, float] = (4.0, 4.0)
    """Floor size of the room (groups standing in the middle, like dining sets, adapt to it)."""


@dataclass
class Model:
    """A composite object (or a group of objects) ready to be placed."""

    name: str
    parts: List[Part] = field(default_factory=list)
    tops: List[TopSurface] = field(default_factory=list)
    lights: List[np.ndarray] = field(default_factory=list)
    """Positions of light sources (lamp bulbs) in the model's frame."""
    access: float = 0.0
    """Depth of the free zone kept in front of the model (local +y) so it stays usable and visible."""

    # Part constructors: (x, y) centre of the footprint, z0 bottom, sizes w (x), d (y), h (z).
    def box(self, x, y, z0, w, d, h, label, material, sub=0, yaw=0.0) -> None:
        self._add(BOX, (x, y, z0 + h / 2), (w / 2, d / 2, h / 2), yaw, label, material, sub)

    def cyl(self, x, y, z0, h, rx, label, material, sub=0, ry=None, yaw=0.0) -> None:
        """A vertical cylinder (elliptic when ``ry`` is given)."""
        self._add(CYLINDER, (x, y, z0 + h / 2), (rx, ry or rx, h / 2), yaw, label, material, sub)

    def ell(self, x, y, zc, rx, ry, rz, label, material, sub=0, yaw=0.0) -> None:
        """An ellipsoid centred at (x, y, zc)."""
        self._add(ELLIPSOID, (x, y, zc), (rx, ry, rz), yaw, label, material, sub)

    def _add(self, kind, center, half, yaw, label, material, sub) -> None:
        half = np.maximum(np.asarray(half, dtype=np.float64), 1e-3)
        self.parts.append(
            Part(kind, np.asarray(center, dtype=np.float64), half, float(yaw), label, sub, material)
        )

    def top(self, x, y, hw, hd, z, host, headroom=0.6) -> None:
        if hw > 0.05 and hd > 0.05:
            self.tops.append(
                TopSurface(np.array([x, y], dtype=np.float64), np.array([hw, hd]), z, host, headroom)
            )

    @property
    def next_sub(self) -> int:
        return max((p.sub for p in self.parts), default=-1) + 1

    def add(self, other: "Model", x: float = 0.0, y: float = 0.0, yaw: float = 0.0, z: float = 0.0) -> None:
        """Merge ``other`` placed at (x, y, z) with ``yaw``; its sub-instances get new numbers."""
        base = self.next_sub
        offset = np.array([x, y, z])
        for p in other.parts:
            center = rotate_z(p.center, yaw) + offset
            self.parts.append(
                Part(p.kind, center, p.half.copy(), p.yaw + yaw, p.label, base + p.sub, p.material)
            )
        for t in other.tops:
            c = rotate_z(np.r_[t.center, 0.0], yaw)[:2] + offset[:2]
            # Tops of rotated members are shrunk to the axis-aligned rectangle inside them (conservative).
            self.tops.append(TopSurface(c, _inner_half(t.half, yaw), t.z + z, t.host, t.headroom))
        for light in other.lights:
            self.lights.append(rotate_z(light, yaw) + offset)

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """Local axis-aligned bounds (lo, hi) [3] over every part's oriented box."""
        center = np.array([p.center for p in self.parts])
        half = np.array([p.half for p in self.parts])
        yaw = np.array([p.yaw for p in self.parts])
        c, s = np.abs(np.cos(yaw)), np.abs(np.sin(yaw))
        # Half extents of a box rotated about z, along x and y.
        extent = np.stack(
            [c * half[:, 0] + s * half[:, 1], s * half[:, 0] + c * half[:, 1], half[:, 2]], axis=1
        )
        return (center - extent).min(axis=0), (center + extent).max(axis=0)

    def labels(self) -> List[str]:
        return sorted({p.label for p in self.parts})


def _inner_half(half: np.ndarray, yaw: float) -> np.ndarray:
    c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
    if s < 1e-6:
        return half.copy()
    if c < 1e-6:
        return half[::-1].copy()
    # A rectangle rotated by a non-right angle: keep a centred square that stays inside it.
    side = min(half) / (c + s)
    return np.array([side, side])


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# ----------------------------------------------------------------------------------------------------
# Shared pieces


def _legs(
    m: Model, w: float, d: float, h: float, label: str, material: str, rng, inset: float = 0.04, sub=0
) -> None:
    """Four legs under a w x d footprint, square or round."""
    size = _u(rng, 0.035, 0.06)
    round_ = rng.random() < 0.4
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * (w / 2 - inset - size / 2), sy * (d / 2 - inset - size / 2)
            if round_:
                m.cyl(x, y, 0.0, h, size / 2, label, material, sub)
            else:
                m.box(x, y, 0.0, size, size, h, label, material, sub)


def _case(
    m: Model,
    rng,
    w: float,
    d: float,
    h: float,
    label: str,
    material: str,
    rows: int,
    cols: int,
    doors: bool,
    leg: float = 0.0,
    sub: int = 0,
    z0: float = 0.0,
    y: float = 0.0,
) -> None:
    """A cabinet body with door or drawer fronts and handles on its front (local +y)."""
    if leg > 0.0:
        _legs(m, w, d, leg, label, material, rng, inset=0.02, sub=sub)
    body_z = z0 + leg
    m.box(0.0, y, body_z, w, d, h - leg, label, material, sub)
    front = material.split("#")[0] + "#front"
    handle = _pick(rng, ["metal", "metal#dark", material])
    cell_w, cell_h = (w - 0.02) / cols, (h - leg - 0.02) / rows
    for r in range(rows):
        for c in range(cols):
            x = -w / 2 + 0.01 + (c + 0.5) * cell_w
            z = body_z + 0.01 + r * cell_h
            m.box(x, y + d / 2 + 0.008, z + 0.004, cell_w - 0.008, 0.016, cell_h - 0.008, label, front, sub)
            if doors:
                hx = (
                    x + (cell_w / 2 - 0.05) * (1 if c < cols / 2 else -1)
                    if cols > 1
                    else x + cell_w / 2 - 0.05
                )
                hh = min(0.25, 0.3 * cell_h)
                m.box(hx, y + d / 2 + 0.026, z + cell_h / 2 - hh / 2, 0.02, 0.02, hh, label, handle, sub)
            else:
                m.box(
                    x,
                    y + d / 2 + 0.026,
                    z + cell_h / 2 - 0.01,
                    min(0.12, 0.5 * cell_w),
                    0.02,
                    0.02,
                    label,
                    handle,
                    sub,
                )


def _tray(m: Model, x, y, z0, w, d, h, label, material, sub, t=0.02) -> None:
    """An open-topped basin of four walls and a bottom (sinks, bathtubs)."""
    m.box(x, y, z0, w, d, t, label, material, sub)
    m.box(x, y - d / 2 + t / 2, z0 + t, w, t, h - t, label, material, sub)
    m.box(x, y + d / 2 - t / 2, z0 + t, w, t, h - t, label, material, sub)
    m.box(x - w / 2 + t / 2, y, z0 + t, t, d - 2 * t, h - t, label, material, sub)
    m.box(x + w / 2 - t / 2, y, z0 + t, t, d - 2 * t, h - t, label, material, sub)


def _faucet(m: Model, x, y, z0, label, sub, reach=0.14) -> None:
    m.cyl(x, y, z0, 0.26, 0.014, label, "metal", sub)
    m.box(x, y + reach / 2, z0 + 0.23, 0.024, reach, 0.024, label, "metal", sub)


# ----------------------------------------------------------------------------------------------------
# Beds, seats, tables


def bed(rng, ctx: BuildContext) -> Model:
    m = Model("bed", access=0.6)
    w = _pick(rng, [0.9, 1.2, 1.4, 1.6, 1.8]) + _u(rng, -0.03, 0.03)
    length = _u(rng, 1.95, 2.15)
    frame = _pick(rng, ["wood", "painted", "fabric#frame"])
    leg = _u(rng, 0.05, 0.14) if rng.random() < 0.5 else 0.0
    frame_top = _u(rng, 0.26, 0.4)
    head_t = _u(rng, 0.05, 0.09)
    y_back = -length / 2
    if leg:
        _legs(m, w, length - head_t, leg, "bed", frame, rng, inset=0.05)
    m.box(0, head_t / 2, leg, w, length - head_t, frame_top - leg, "bed", frame)
    mattress_h = _u(rng, 0.16, 0.26)
    m.box(
        0,
        head_t / 2 + 0.01,
        frame_top,
        w - 0.04,
        length - head_t - 0.06,
        mattress_h,
        "bed",
        "fabric#mattress",
    )
    top = frame_top + mattress_h
    m.box(0, y_back + head_t / 2, 0, w + 0.04, head_t, _u(rng, 0.85, 1.25), "bed", frame)
    if rng.random() < 0.3:
        m.box(0, length / 2 - 0.025, 0, w + 0.04, 0.05, frame_top + _u(rng, 0.1, 0.3), "bed", frame)
    if rng.random() < 0.75:
        blanket = (length - head_t) * _u(rng, 0.55, 0.75)
        m.box(
            0,
            length / 2 - 0.06 - blanket / 2,
            top - 0.6 * mattress_h,
            w + 0.02,
            blanket,
            0.6 * mattress_h + 0.03,
            "bed",
            "fabric#blanket",
        )
    count = 1 if w < 1.1 else (2 if rng.random() < 0.8 else 3)
    rx = min(0.34, (w - 0.08) / count / 2 - 0.02)
    ry, rz = _u(rng, 0.16, 0.21), _u(rng, 0.06, 0.09)
    for k in range(count):
        x = -w / 2 + 0.04 + (k + 0.5) * (w - 0.08) / count
        m.ell(
            x,
            y_back + head_t + 0.04 + ry,
            top + 0.75 * rz,
            rx,
            ry,
            rz,
            "pillow",
            "fabric#pillow",
            sub=k + 1,
            yaw=_u(rng, -0.12, 0.12),
        )
    return m


def night_stand(rng, ctx: BuildContext) -> Model:
    m = Model("night_stand", access=0.3)
    w, d, h = _u(rng, 0.4, 0.55), _u(rng, 0.35, 0.45), _u(rng, 0.45, 0.62)
    _case(
        m,
        rng,
        w,
        d,
        h,
        "night stand",
        _pick(rng, ["wood", "painted"]),
        int(rng.integers(1, 3)),
        1,
        False,
        leg=_u(rng, 0.06, 0.12) if rng.random() < 0.5 else 0.0,
    )
    m.top(0, 0, w / 2 - 0.03, d / 2 - 0.03, h, "night stand")
    return m


def bed_set(rng, ctx: BuildContext) -> Model:
    """A bed with zero to two night stands at its head."""
    m = Model("bed_set", access=0.6)
    b = bed(rng, ctx)
    m.add(b)
    lo, hi = b.bounds()
    stand = night_stand(rng, ctx)
    s_lo, s_hi = stand.bounds()
    count = int(rng.choice([0, 1, 2], p=[0.15, 0.3, 0.55]))
    sides = [-1, 1] if count == 2 else [int(_pick(rng, [-1, 1]))] * count
    for side in sides:
        x = (hi[0] + 0.06 - s_lo[0]) if side > 0 else (lo[0] - 0.06 - s_hi[0])
        m.add(stand, x, lo[1] - s_lo[1])
    return m


def chair(rng, ctx: BuildContext) -> Model:
    m = Model("chair")
    s = _u(rng, 0.4, 0.48)
    d = s * _u(rng, 0.95, 1.1)
    seat_z, seat_t = _u(rng, 0.42, 0.47), _u(rng, 0.035, 0.06)
    frame = _pick(rng, ["wood", "painted", "metal"])
    seat = _pick(rng, ["wood", "fabric#seat", "leather", frame])
    _legs(m, s, d, seat_z - seat_t, "chair", frame, rng, inset=0.02)
    m.box(0, 0, seat_z - seat_t, s, d, seat_t, "chair", seat)
    back_h = _u(rng, 0.35, 0.5)
    for sx in (-1, 1):
        m.box(sx * (s / 2 - 0.02), -d / 2 + 0.02, seat_z, 0.03, 0.03, back_h, "chair", frame)
    slat_h = _u(rng, 0.12, 0.3)
    m.box(
        0,
        -d / 2 + 0.02,
        seat_z + back_h - slat_h,
        s - 0.04,
        0.025,
        slat_h,
        "chair",
        seat if rng.random() < 0.5 else frame,
    )
    if rng.random() < 0.4 and back_h - slat_h > 0.2:
        m.box(0, -d / 2 + 0.02, seat_z + 0.12, s - 0.04, 0.02, 0.05, "chair", frame)
    return m


def office_chair(rng, ctx: BuildContext) -> Model:
    m = Model("office_chair")
    seat_z = _u(rng, 0.44, 0.52)
    cover = _pick(rng, ["fabric", "leather", "plastic"])
    phase = _u(rng, 0, 2 * math.pi)
    for k in range(5):
        # A five-legged star base: boxes rotated about z.
        phi = phase + 2 * math.pi * k / 5
        m.box(
            0.14 * math.cos(phi),
            0.14 * math.sin(phi),
            0.04,
            0.28,
            0.05,
            0.035,
            "chair",
            "metal#dark",
            yaw=phi,
        )
        m.ell(0.27 * math.cos(phi), 0.27 * math.sin(phi), 0.025, 0.025, 0.025, 0.025, "chair", "metal#dark")
    m.cyl(0, 0, 0.075, seat_z - 0.07 - 0.075, 0.028, "chair", "metal")
    m.box(0, 0.02, seat_z - 0.07, 0.48, 0.46, 0.07, "chair", cover)
    back_h = _u(rng, 0.4, 0.6)
    m.box(0, -0.23, seat_z + 0.08, 0.44, 0.06, back_h, "chair", cover)
    m.box(0, -0.22, seat_z - 0.05, 0.05, 0.03, 0.15, "chair", "metal#dark")
    if rng.random() < 0.5:
        for sx in (-1, 1):
            m.box(sx * 0.25, 0.0, seat_z, 0.03, 0.03, 0.2, "chair", "metal#dark")
            m.box(sx * 0.25, 0.0, seat_z + 0.2, 0.05, 0.26, 0.03, "chair", "plastic#arm")
    return m


def armchair(rng, ctx: BuildContext) -> Model:
    m = Model("armchair", access=0.4)
    w, d = _u(rng, 0.72, 0.92), _u(rng, 0.72, 0.88)
    seat_z, arm = _u(rng, 0.4, 0.45), _u(rng, 0.1, 0.18)
    cover = _pick(rng, ["fabric", "leather"])
    _legs(m, w, d, 0.08, "chair", "wood", rng, inset=0.03)
    m.box(0, 0, 0.08, w, d, seat_z - 0.08 - 0.1, "chair", cover)
    m.box(0, 0.05, seat_z - 0.1, w - 2 * arm, d - 0.2, 0.1, "chair", cover + "#cushion")
    m.box(0, -d / 2 + 0.1, seat_z - 0.1, w - 2 * arm, 0.2, _u(rng, 0.35, 0.5), "chair", cover)
    for sx in (-1, 1):
        m.box(sx * (w / 2 - arm / 2), 0, 0.08, arm, d, seat_z - 0.08 + _u(rng, 0.15, 0.25), "chair", cover)
    return m


def sofa(rng, ctx: BuildContext) -> Model:
    m = Model("sofa", access=0.5)
    w, d = _u(rng, 1.5, 2.4), _u(rng, 0.82, 0.98)
    arm, seat_z, back_t = _u(rng, 0.12, 0.22), _u(rng, 0.4, 0.46), _u(rng, 0.18, 0.25)
    cover = _pick(rng, ["fabric", "fabric", "leather"])
    _legs(m, w, d, 0.08, "sofa", "wood", rng, inset=0.03)
    m.box(0, 0, 0.08, w, d, seat_z - 0.18, "sofa", cover)
    inner = w - 2 * arm
    count = max(1, round(inner / 0.65))
    for k in range(count):
        x = -inner / 2 + (k + 0.5) * inner / count
        m.box(
            x,
            back_t / 2 + 0.01,
            seat_z - 0.1,
            inner / count - 0.012,
            d - back_t - 0.02,
            0.1,
            "sofa",
            cover + "#cushion",
        )
    back_h = _u(rng, 0.35, 0.45)
    m.box(0, -d / 2 + back_t / 2, seat_z - 0.1, inner, back_t, back_h, "sofa", cover)
    for sx in (-1, 1):
        m.box(sx * (w / 2 - arm / 2), 0, 0.08, arm, d, seat_z - 0.08 + _u(rng, 0.12, 0.22), "sofa", cover)
    for k in range(int(rng.integers(0, 4))):
        x = -inner / 2 + (k + 0.5) * inner / 3 + _u(rng, -0.05, 0.05)
        size = _u(rng, 0.36, 0.45)
        m.box(
            x,
            -d / 2 + back_t + 0.07,
            seat_z,
            size,
            _u(rng, 0.1, 0.13),
            size,
            "pillow",
            "fabric#pillow",
            sub=k + 1,
            yaw=_u(rng, -0.25, 0.25),
        )
    return m


def coffee_table(rng, ctx: BuildContext, label: str = "table") -> Model:
    m = Model("coffee_table")
    material = _pick(rng, ["wood", "painted", "wood#dark"])
    h = _u(rng, 0.38, 0.48)
    if rng.random() < 0.3:
        r = _u(rng, 0.35, 0.5)
        m.cyl(0, 0, h - 0.04, 0.04, r, label, material)
        m.cyl(0, 0, 0, h - 0.04, 0.05, label, "metal")
        m.cyl(0, 0, 0, 0.02, r * 0.6, label, "metal")
        m.top(0, 0, r * 0.68, r * 0.68, h, label)
        return m
    w, d, t = _u(rng, 0.8, 1.3), _u(rng, 0.45, 0.7), _u(rng, 0.03, 0.05)
    m.box(0, 0, h - t, w, d, t, label, material)
    _legs(m, w, d, h - t, label, material, rng)
    if rng.random() < 0.4:
        m.box(0, 0, 0.1, w - 0.1, d - 0.1, 0.02, label, material)
    m.top(0, 0, w / 2 - 0.04, d / 2 - 0.04, h, label)
    return m


def side_table(rng, ctx: BuildContext) -> Model:
    m = Model("side_table", access=0.2)
    s, h = _u(rng, 0.4, 0.55), _u(rng, 0.5, 0.65)
    material = _pick(rng, ["wood", "painted"])
    m.box(0, 0, h - 0.03, s, s, 0.03, "table", material)
    _legs(m, s, s, h - 0.03, "table", material, rng, inset=0.02)
    m.top(0, 0, s / 2 - 0.03, s / 2 - 0.03, h, "table")
    return m


def sofa_set(rng, ctx: BuildContext) -> Model:
    """A sofa with (usually) a coffee table in front of it."""
    m = Model("sofa_set", access=0.3)
    s = sofa(rng, ctx)
    m.add(s)
    lo, hi = s.bounds()
    if rng.random() < 0.85:
        table = coffee_table(rng, ctx)
        t_lo, _ = table.bounds()
        m.add(table, _u(rng, -0.1, 0.1), hi[1] + _u(rng, 0.35, 0.5) - t_lo[1])
    return m


def dining_set(rng, ctx: BuildContext, meeting: bool = False) -> Model:
    """A table with chairs around it facing it (each chair its own instance, slightly turned), and sometimes a
    pendant lamp above it."""
    m = Model("meeting_set" if meeting else "dining_set")
    material = _pick(rng, ["wood", "painted", "wood#dark"])
    h = _u(rng, 0.73, 0.77)
    make_chair = office_chair if meeting else chair
    template = make_chair(rng, ctx)
    c_lo, c_hi = template.bounds()
    c_w, c_d = c_hi[0] - c_lo[0], c_hi[1] - c_lo[1]
    seats: List[Tuple[float, float, float]] = []  # (x, y, yaw) of each chair
    if rng.random() < 0.3 and not meeting:
        r = _u(rng, 0.45, max(0.46, min(0.65, min(ctx.room_size) / 2 - 1.2)))
        m.cyl(0, 0, h - 0.04, 0.04, r, "table", material)
        m.cyl(0, 0, 0, h - 0.04, 0.06, "table", material)
        m.cyl(0, 0, 0, 0.03, r * 0.55, "table", material)
        m.top(0, 0, r * 0.68, r * 0.68, h, "table")
        n = int(rng.integers(3, 6))
        phase = _u(rng, 0, 2 * math.pi)
        for k in range(n):
            phi = phase + 2 * math.pi * k / n
            dist = r + c_d / 2 - 0.12 + _u(rng, 0.0, 0.15)
            seats.append((dist * math.cos(phi), dist * math.sin(phi), phi + math.pi / 2))
        extent = r
    else:
        # Leave about a metre and a half around the table in the room's shorter direction.
        longest = max(0.9, min(2.2 if meeting else 2.0, min(ctx.room_size) - 1.4))
        w, d = _u(rng, min(1.0, longest), longest), _u(rng, 0.75, 1.0)
        m.box(0, 0, h - 0.04, w, d, 0.04, "table", material)
        _legs(m, w, d, h - 0.04, "table", material, rng, inset=0.05)
        m.top(0, 0, w / 2 - 0.05, d / 2 - 0.05, h, "table")
        per_side = max(1, int((w - 0.2) // 0.62))
        for side in (-1, 1):
            for k in range(per_side):
                x = -w / 2 + (k + 0.5) * w / per_side + _u(rng, -0.04, 0.04)
                x = float(np.clip(x, -w / 2 + c_w / 2 + 0.1, w / 2 - c_w / 2 - 0.1))
                y = side * (d / 2 + c_d / 2 - 0.12 + _u(rng, 0.0, 0.15))
                seats.append((x, y, 0.0 if side < 0 else math.pi))
        for side in (-1, 1):
            if rng.random() < 0.35:
                x = side * (w / 2 + c_d / 2 - 0.1 + _u(rng, 0.0, 0.12))
                seats.append((x, 0.0, side * math.pi / 2))
        extent = max(w, d) / 2
    for x, y, yaw in seats:
        if rng.random() < 0.12:
            continue  # a chair taken away
        m.add(template, x, y, yaw + _u(rng, -0.25, 0.25))
    if rng.random() < (0.3 if meeting else 0.55):
        sub = m.next_sub
        z_shade = ctx.ceiling - _u(rng, 0.65, 0.9)
        r = _u(rng, 0.14, min(0.3, extent * 0.5))
        m.cyl(0, 0, z_shade + 0.15, ctx.ceiling - z_shade - 0.15, 0.006, "lamp", "metal#dark", sub)
        if rng.random() < 0.5:
            m.cyl(0, 0, z_shade, 0.15, r, "lamp", "lampshade", sub)
        else:
            m.ell(0, 0, z_shade + 0.08, r, r, 0.08, "lamp", "lampshade", sub)
        m.lights.append(np.array([0.0, 0.0, z_shade - 0.05]))
    return m


# ----------------------------------------------------------------------------------------------------
# Storage


def dresser(rng, ctx: BuildContext) -> Model:
    m = Model("dresser", access=0.5)
    w, d, h = _u(rng, 0.8, 1.5), _u(rng, 0.42, 0.55), _u(rng, 0.75, 1.1)
    _case(
        m,
        rng,
        w,
        d,
        h,
        "dresser",
        _pick(rng, ["wood", "painted"]),
        int(rng.integers(3, 5)),
        int(rng.integers(1, 3)),
        False,
        leg=_u(rng, 0.05, 0.12) if rng.random() < 0.4 else 0.0,
    )
    m.top(0, 0, w / 2 - 0.03, d / 2 - 0.03, h, "dresser")
    return m


def wardrobe(rng, ctx: BuildContext) -> Model:
    m = Model("wardrobe", access=0.6)
    w, d = _u(rng, 0.8, 1.7), _u(rng, 0.5, 0.62)
    h = min(_u(rng, 1.8, 2.2), ctx.ceiling - 0.15)
    _case(
        m,
        rng,
        w,
        d,
        h,
        "cabinet",
        _pick(rng, ["wood", "painted"]),
        1,
        int(rng.integers(2, 4)),
        True,
        leg=0.08 if rng.random() < 0.5 else 0.0,
    )
    return m


def low_cabinet(rng, ctx: BuildContext) -> Model:
    m = Model("cabinet", access=0.4)
    w, d, h = _u(rng, 0.8, 1.6), _u(rng, 0.38, 0.5), _u(rng, 0.5, 0.85)
    doors = rng.random() < 0.6
    _case(
        m,
        rng,
        w,
        d,
        h,
        "cabinet",
        _pick(rng, ["wood", "painted"]),
        1 if doors else int(rng.integers(2, 4)),
        int(rng.integers(2, 4)),
        doors,
        leg=_u(rng, 0.06, 0.15) if rng.random() < 0.5 else 0.0,
    )
    m.top(0, 0, w / 2 - 0.03, d / 2 - 0.03, h, "cabinet")
    return m


def file_cabinet(rng, ctx: BuildContext) -> Model:
    m = Model("file_cabinet", access=0.5)
    w, d, h = _u(rng, 0.4, 0.5), _u(rng, 0.5, 0.6), _u(rng, 0.7, 1.3)
    _case(m, rng, w, d, h, "cabinet", _pick(rng, ["metal", "painted"]), int(rng.integers(2, 5)), 1, False)
    m.top(0, 0, w / 2 - 0.03, d / 2 - 0.03, h, "cabinet")
    return m


def _book_row(
    m: Model, rng, x0: float, x1: float, y_front: float, depth: float, z0: float, height: float
) -> None:
    """Books standing side by side from x0 towards x1: one ``books`` instance, each book its own colour."""
    sub = m.next_sub
    x = x0
    fill = x0 + (x1 - x0) * _u(rng, 0.35, 0.95)
    k = 0
    while x < fill and k < 18:
        bw = _u(rng, 0.02, 0.05)
        if x + bw > x1:
            break
        bh = height * _u(rng, 0.65, 1.0)
        bd = depth * _u(rng, 0.75, 1.0)
        m.box(x + bw / 2, y_front - bd / 2, z0, bw, bd, bh, "books", f"book#{k % 7}", sub)
        x += bw + (0.002 if rng.random() < 0.85 else _u(rng, 0.02, 0.06))
        k += 1


def _storage_box(m: Model, rng, x, y, z0, w, d, h, yaw=0.0) -> None:
    sub = m.next_sub
    material = _pick(rng, ["cardboard", "cardboard", "plastic"])
    m.box(x, y, z0, w, d, h, "box", material, sub, yaw)
    if material == "cardboard" and rng.random() < 0.6:
        m.box(x, y, z0 + h, min(0.05, w * 0.3), d, 0.003, "box", "plastic#tape", sub, yaw)


def bookshelf(rng, ctx: BuildContext) -> Model:
    m = Model("bookshelf", access=0.5)
    w, d = _u(rng, 0.6, 1.2), _u(rng, 0.28, 0.38)
    h = min(_u(rng, 1.2, 2.1), ctx.ceiling - 0.15)
    t = _u(rng, 0.018, 0.03)
    material = _pick(rng, ["wood", "painted", "wood#dark"])
    base = _u(rng, 0.05, 0.1)
    for sx in (-1, 1):
        m.box(sx * (w / 2 - t / 2), 0, 0, t, d, h, "bookshelf", material)
    m.box(0, 0, h - t, w - 2 * t, d, t, "bookshelf", material)
    m.box(0, 0, 0, w - 2 * t, d, base, "bookshelf", material)
    m.box(0, -d / 2 + 0.005, base, w - 2 * t, 0.01, h - t - base, "bookshelf", material + "#back")
    levels = max(2, round((h - base - t) / _u(rng, 0.3, 0.38)))
    gap = (h - base - t) / levels
    for k in range(1, levels):
        m.box(0, 0, base + k * gap - t / 2, w - 2 * t, d - 0.012, t, "bookshelf", material)
    for k in range(levels):
        floor = base + k * gap + (t / 2 if k else 0.0)
        clear = gap - (t / 2 if k else 0.0) - (t / 2 if k < levels - 1 else t)
        content = rng.choice(["books", "books", "books", "box", "empty"])
        if content == "books":
            _book_row(
                m,
                rng,
                -w / 2 + t + 0.01,
                w / 2 - t - 0.01,
                d / 2 - 0.01,
                min(0.24, d - 0.04),
                floor,
                min(0.32, clear - 0.02),
            )
        elif content == "box":
            bw = _u(rng, 0.2, max(0.21, w - 2 * t - 0.05))
            _storage_box(
                m,
                rng,
                _u(rng, -1, 1) * (w / 2 - t - bw / 2 - 0.01),
                0.0,
                floor,
                bw,
                d - 0.06,
                min(clear - 0.03, _u(rng, 0.12, 0.25)),
            )
    if h < 1.6:
        m.top(0, 0, w / 2 - 0.03, d / 2 - 0.03, h, "bookshelf")
    return m


def wall_shelves(rng, ctx: BuildContext) -> Model:
    """Boards on brackets, hung on a wall, with books, boxes or a small plant on them."""
    m = Model("wall_shelves")
    w, d, t = _u(rng, 0.6, 1.3), _u(rng, 0.2, 0.3), 0.025
    count = int(rng.integers(1, 4))
    spacing = _u(rng, 0.3, 0.4)
    z_low = min(_u(rng, 1.0, 1.5), ctx.ceiling - 0.3 - (count - 1) * spacing)
    material = _pick(rng, ["wood", "painted"])
    for k in range(count):
        z = z_low + k * spacing
        m.box(0, d / 2, z, w, d, t, "shelves", material)
        for sx in (-1, 1):
            m.box(sx * (w / 2 - 0.08), d * 0.4, z - 0.1, 0.02, d * 0.8, 0.1, "shelves", "metal")
        room = spacing - t - 0.03 if k < count - 1 else 0.3
        what = rng.choice(["books", "box", "plant", "none"], p=[0.45, 0.2, 0.15, 0.2])
        if what == "books":
            _book_row(m, rng, -w / 2 + 0.03, w / 2 - 0.03, d - 0.005, d - 0.03, z + t, min(0.28, room))
        elif what == "box":
            bw = _u(rng, 0.15, min(0.4, w - 0.1))
            _storage_box(
                m,
                rng,
                _u(rng, -1, 1) * (w / 2 - bw / 2 - 0.03),
                d / 2,
                z + t,
                bw,
                d - 0.05,
                min(room, _u(rng, 0.1, 0.2)),
            )
        elif what == "plant":
            m.add(small_plant(rng, ctx, max_height=room), _u(rng, -1, 1) * (w / 2 - 0.12), d / 2, z + t)
    return m


# ----------------------------------------------------------------------------------------------------
# Work


def desk(rng, ctx: BuildContext) -> Model:
    m = Model("desk", access=0.2)
    w, d, h, t = _u(rng, 1.0, 1.7), _u(rng, 0.55, 0.8), _u(rng, 0.72, 0.77), 0.03
    material = _pick(rng, ["wood", "painted", "wood#dark"])
    m.box(0, 0, h - t, w, d, t, "desk", material)
    style = int(rng.integers(3))
    if style == 0:
        _legs(m, w, d, h - t, "desk", _pick(rng, [material, "metal"]), rng)
    elif style == 1:
        for sx in (-1, 1):
            m.box(sx * (w / 2 - 0.015), 0, 0, 0.03, d - 0.02, h - t, "desk", material)
        m.box(0, -d / 2 + 0.03, h - t - 0.35, w - 0.06, 0.02, 0.35, "desk", material)
    else:
        side = _pick(rng, [-1, 1])
        ped_w = 0.4
        x = side * (w / 2 - ped_w / 2 - 0.01)
        m.box(x, 0, 0, ped_w, d - 0.04, h - t, "desk", material)
        for k in range(3):
            z = 0.02 + k * (h - t - 0.04) / 3
            m.box(
                x,
                d / 2 - 0.012,
                z + 0.005,
                ped_w - 0.02,
                0.016,
                (h - t - 0.04) / 3 - 0.01,
                "desk",
                material + "#front",
            )
            m.box(x, d / 2 + 0.008, z + (h - t - 0.04) / 6, 0.1, 0.02, 0.02, "desk", "metal")
        for sy in (-1, 1):
            m.box(-side * (w / 2 - 0.04), sy * (d / 2 - 0.04), 0, 0.05, 0.05, h - t, "desk", material)
    m.top(0, 0, w / 2 - 0.04, d / 2 - 0.04, h, "desk")
    return m


def desk_set(rng, ctx: BuildContext) -> Model:
    """A desk with a chair pulled out in front of it, turned a little or a lot."""
    m = Model("desk_set", access=0.2)
    dk = desk(rng, ctx)
    m.add(dk)
    _, hi = dk.bounds()
    seat = office_chair(rng, ctx) if rng.random() < 0.6 else chair(rng, ctx)
    s_lo, s_hi = seat.bounds()
    depth = s_hi[1] - s_lo[1]
    m.add(seat, _u(rng, -0.15, 0.15), hi[1] + depth / 2 - _u(rng, 0.05, 0.25), math.pi + _u(rng, -0.6, 0.6))
    return m


def whiteboard(rng, ctx: BuildContext) -> Model:
    m = Model("whiteboard")
    w, h = _u(rng, 1.0, 2.0), _u(rng, 0.7, 1.2)
    zc = min(_u(rng, 1.35, 1.55), ctx.ceiling - h / 2 - 0.2)
    z0 = zc - h / 2
    m.box(0, 0.01, z0, w, 0.02, h, "whiteboard", "whiteboard")
    f = 0.025
    for sx in (-1, 1):
        m.box(sx * (w / 2 + f / 2), 0.0125, z0 - f, f, 0.025, h + 2 * f, "whiteboard", "metal")
    for z in (z0 - f, z0 + h):
        m.box(0, 0.0125, z, w, 0.025, f, "whiteboard", "metal")
    m.box(0, 0.04, z0 - f - 0.03, w * 0.5, 0.06, 0.03, "whiteboard", "metal")
    return m


# ----------------------------------------------------------------------------------------------------
# Kitchen and bathroom


def refrigerator(rng, ctx: BuildContext) -> Model:
    m = Model("refrigerator", access=0.7)
    w, d = _u(rng, 0.6, 0.9), _u(rng, 0.62, 0.75)
    h = min(_u(rng, 1.65, 2.0), ctx.ceiling - 0.1)
    material = _pick(rng, ["appliance", "metal"])
    m.box(0, -0.02, 0, w, d - 0.04, h, "refrigerator", material)
    split = h * _u(rng, 0.3, 0.4)
    parts = [(0.0, split), (split, h)] if rng.random() < 0.5 else [(0.0, h - split), (h - split, h)]
    for z0, z1 in parts:
        m.box(0, d / 2 - 0.02, z0 + 0.005, w - 0.01, 0.04, z1 - z0 - 0.01, "refrigerator", material + "#door")
        hh = min(0.5, 0.6 * (z1 - z0))
        m.box(
            w / 2 - 0.06,
            d / 2 + 0.0175,
            (z0 + z1) / 2 - hh / 2,
            0.025,
            0.035,
            hh,
            "refrigerator",
            "metal#handle",
        )
    return m


def counter_run(rng, ctx: BuildContext) -> Model:
    """Kitchen base cabinets under a counter top with a sink, and often upper cabinets on the wall above."""
    m = Model("kitchen_counter", access=0.8)
    length = min(_u(rng, 1.6, 3.4), ctx.max_length - 0.1)
    h, d, plinth, top_t = _u(rng, 0.86, 0.92), 0.6, 0.1, 0.04
    body = _pick(rng, ["painted", "wood"])
    m.box(0, -0.04, 0, length - 0.04, d - 0.1, plinth, "cabinet", body + "#plinth")
    _case(
        m,
        rng,
        length,
        d - 0.04,
        h - top_t - plinth,
        "cabinet",
        body,
        1,
        max(1, round(length / _u(rng, 0.45, 0.6))),
        True,
        z0=plinth,
        y=-0.02,
    )
    m.box(
        0,
        0.005,
        h - top_t,
        length + 0.02,
        d + 0.01,
        top_t,
        "counter",
        _pick(rng, ["stone", "wood", "metal"]),
        sub=1,
    )
    tops: List[Tuple[float, float]] = [(-length / 2 + 0.03, length / 2 - 0.03)]
    if rng.random() < 0.85 and length > 1.0:
        sw, sd = _u(rng, 0.45, 0.7), 0.42
        xs = _u(rng, -length / 2 + sw / 2 + 0.1, length / 2 - sw / 2 - 0.1)
        _tray(m, xs, 0.02, h, sw, sd, 0.1, "sink", "metal", sub=2)
        _faucet(m, xs, 0.02 - sd / 2 - 0.04, h, "sink", sub=2)
        tops = [(-length / 2 + 0.03, xs - sw / 2 - 0.04), (xs + sw / 2 + 0.04, length / 2 - 0.03)]
    headroom = 0.6
    if rng.random() < 0.7:
        z0 = h + _u(rng, 0.5, 0.6)
        z1 = min(z0 + _u(rng, 0.6, 0.8), ctx.ceiling - 0.05)
        if z1 - z0 > 0.3:
            sub = m.next_sub
            _case(
                m,
                rng,
                length,
                0.35,
                z1 - z0,
                "cabinet",
                body,
                1,
                max(1, round(length / _u(rng, 0.4, 0.6))),
                True,
                sub=sub,
                z0=z0,
                y=-d / 2 + 0.175,
            )
            headroom = z0 - h - 0.05
    for x0, x1 in tops:
        if x1 - x0 > 0.2:
            m.top((x0 + x1) / 2, 0.05, (x1 - x0) / 2, d / 2 - 0.1, h, "counter", headroom)
    return m


def toilet(rng, ctx: BuildContext) -> Model:
    m = Model("toilet", access=0.6)
    material = "ceramic"
    m.cyl(0, 0.0, 0, 0.2, 0.12, "toilet", material, ry=0.17)
    m.cyl(0, 0.05, 0.18, 0.22, 0.19, "toilet", material, ry=0.25)
    m.cyl(0, 0.06, 0.4, 0.025, 0.2, "toilet", _pick(rng, [material, "plastic"]), ry=0.26)
    if rng.random() < 0.6:
        m.cyl(0, 0.06, 0.425, 0.015, 0.19, "toilet", material + "#lid", ry=0.25)
    tw, td, th = _u(rng, 0.36, 0.44), _u(rng, 0.15, 0.2), _u(rng, 0.3, 0.4)
    m.box(0, -0.22, 0.38, tw, td, th, "toilet", material)
    m.box(0, -0.22, 0.38 + th, tw + 0.02, td + 0.02, 0.025, "toilet", material + "#lid")
    m.cyl(0, -0.22, 0.38 + th + 0.025, 0.01, 0.025, "toilet", "metal")
    return m


def vanity(rng, ctx: BuildContext) -> Model:
    """A bathroom sink: a vanity cabinet (or a pedestal) with a basin and a faucet, and a mirror above."""
    m = Model("vanity", access=0.6)
    w, d = _u(rng, 0.5, 1.0), _u(rng, 0.42, 0.5)
    h = _u(rng, 0.78, 0.86)
    if rng.random() < 0.7:
        _case(m, rng, w, d, h, "cabinet", _pick(rng, ["painted", "wood"]), 1, int(rng.integers(1, 3)), True)
        sw = min(w - 0.1, _u(rng, 0.4, 0.55))
        _tray(m, 0, 0.02, h, sw, d - 0.12, 0.12, "sink", "ceramic", sub=1)
        _faucet(m, 0, 0.02 - (d - 0.12) / 2 - 0.04, h, "sink", sub=1)
        top_z = h + 0.12
    else:
        w, sw = 0.55, 0.5
        m.cyl(0, 0.0, 0, h - 0.12, 0.09, "sink", "ceramic", sub=1)
        _tray(m, 0, 0.02, h - 0.14, sw, 0.4, 0.14, "sink", "ceramic", sub=1)
        _faucet(m, 0, 0.02 - 0.2 - 0.04, h, "sink", sub=1)
        top_z = h
    if rng.random() < 0.9:
        sub = m.next_sub
        mw = min(w, _u(rng, 0.45, 0.9))
        mh = _u(rng, 0.5, 0.9)
        z0 = min(top_z + _u(rng, 0.3, 0.45), ctx.ceiling - mh - 0.15)
        m.box(
            0,
            -d / 2 + 0.01,
            z0 - 0.02,
            mw + 0.04,
            0.02,
            mh + 0.04,
            "mirror",
            _pick(rng, ["metal", "wood"]),
            sub,
        )
        m.box(0, -d / 2 + 0.0125, z0, mw, 0.025, mh, "mirror", "mirror", sub)
    return m


def bathtub(rng, ctx: BuildContext) -> Model:
    m = Model("bathtub", access=0.6)
    length = min(_u(rng, 1.5, 1.8), ctx.max_length - 0.05)
    w, h = _u(rng, 0.7, 0.8), _u(rng, 0.5, 0.6)
    _tray(m, 0, 0, 0, length, w, h, "bathtub", "ceramic", 0, t=0.07)
    _faucet(m, -length / 2 + 0.035, -w / 2 + 0.12, h, "bathtub", 0, reach=0.12)
    if rng.random() < 0.5:
        rod_z = min(2.0, ctx.ceiling - 0.1)
        cl = length * _u(rng, 0.4, 0.8)
        m.box(0, w / 2 - 0.05, rod_z, length, 0.02, 0.02, "shower curtain", "metal", 1)
        m.box(
            -length / 2 + cl / 2,
            w / 2 - 0.05,
            h + 0.06,
            cl,
            0.02,
            rod_z - h - 0.06,
            "shower curtain",
            "curtain",
            1,
        )
    return m


def towel(rng, ctx: BuildContext) -> Model:
    m = Model("towel")
    bw = _u(rng, 0.4, 0.6)
    z_bar = _u(rng, 1.0, 1.45)
    for sx in (-1, 1):
        m.box(sx * (bw / 2 - 0.02), 0.03, z_bar - 0.02, 0.02, 0.06, 0.04, "towel", "metal")
    m.box(0, 0.06, z_bar - 0.01, bw, 0.02, 0.02, "towel", "metal")
    th = _u(rng, 0.35, 0.6)
    m.box(0, 0.06, z_bar - th, bw - 0.08, 0.03, th + 0.02, "towel", "towel")
    return m


# ----------------------------------------------------------------------------------------------------
# Openings and things on walls


def door(rng, ctx: BuildContext) -> Model:
    m = Model("door", access=0.9)
    w, t = _u(rng, 0.78, 0.95), 0.04
    h = min(_u(rng, 1.98, 2.12), ctx.ceiling - 0.12)
    material = _pick(rng, ["wood", "painted"])
    m.box(0, 0.002 + t / 2, 0, w, t, h, "door", material)
    cw = _u(rng, 0.05, 0.09)
    for sx in (-1, 1):
        m.box(sx * (w / 2 + cw / 2), 0.012, 0, cw, 0.024, h + cw, "door", material + "#casing")
    m.box(0, 0.012, h, w, 0.024, cw, "door", material + "#casing")
    side = _pick(rng, [-1, 1])
    x = side * (w / 2 - 0.08)
    m.box(x, t + 0.012, 0.96, 0.05, 0.02, 0.1, "door", "metal")
    m.box(x - side * 0.04, t + 0.04, 1.0, 0.13, 0.025, 0.025, "door", "metal")
    return m


def open_door_leaf(rng, ctx: BuildContext, width: float, height: float) -> Model:
    """A door leaf (with handle) standing open: its hinge edge at the origin, extending along local +x."""
    m = Model("open_door")
    t = 0.04
    material = _pick(rng, ["wood", "painted"])
    m.box(width / 2, 0, 0, width, t, height, "door", material)
    for sy in (-1, 1):
        m.box(width - 0.09, sy * (t / 2 + 0.03), 1.0, 0.13, 0.025, 0.025, "door", "metal")
        m.box(width - 0.05, sy * (t / 2 + 0.012), 0.96, 0.05, 0.024, 0.1, "door", "metal")
    return m


def window(rng, ctx: BuildContext) -> Model:
    """A window: the view outside behind a frame, a sill, and curtains (separate instances) or blinds."""
    m = Model("window")
    w = min(_u(rng, 0.8, 1.8), ctx.max_length - 0.4)
    z0 = _u(rng, 0.75, 1.0)
    z1 = min(_u(rng, 1.9, 2.2), ctx.ceiling - 0.2)
    h = z1 - z0
    frame = _pick(rng, ["painted", "wood", "metal"])
    m.box(0, 0.006, z0, w, 0.012, h, "window", "glass_outdoor")
    fw = _u(rng, 0.04, 0.07)
    for sx in (-1, 1):
        m.box(sx * (w / 2 - fw / 2), 0.025, z0, fw, 0.05, h, "window", frame)
    for z in (z0, z1 - fw):
        m.box(0, 0.025, z, w - 2 * fw, 0.05, fw, "window", frame)
    if rng.random() < 0.6:
        m.box(0, 0.02, z0 + fw, fw * 0.7, 0.04, h - 2 * fw, "window", frame)
    if rng.random() < 0.3:
        m.box(0, 0.02, z0 + h * 0.62, w - 2 * fw, 0.04, fw * 0.7, "window", frame)
    m.box(0, 0.07, z0 - 0.04, w + 0.12, 0.14, 0.04, "window", frame + "#sill")
    style = rng.random()
    if style < 0.5:
        cw = _u(rng, 0.3, 0.55)
        floor_length = rng.random() < 0.6
        cz0 = 0.02 if floor_length else z0 - 0.1
        cz1 = min(z1 + _u(rng, 0.08, 0.2), ctx.ceiling - 0.03)
        cd = _u(rng, 0.05, 0.09)
        overlap = _u(rng, 0.05, 0.15)
        for k, sx in enumerate((-1, 1)):
            m.box(
                sx * (w / 2 + cw / 2 - overlap),
                0.2,
                cz0,
                cw,
                cd,
                cz1 - cz0 - 0.03,
                "curtain",
                "curtain",
                k + 1,
            )
        m.box(0, 0.2, cz1 - 0.025, w + 2 * cw, 0.025, 0.025, "curtain", "metal", 1)
    elif style < 0.8:
        bh = h * _u(rng, 0.2, 0.8)
        m.box(0, 0.075, z1 - bh, w - 0.02, 0.03, bh, "blinds", "blinds", 1)
    return m


def picture(rng, ctx: BuildContext) -> Model:
    m = Model("picture")
    photo = _pick(rng, sorted(PHOTO_ASPECT))
    aspect = PHOTO_ASPECT[photo]
    w = _u(rng, 0.35, 1.0)
    h = w / aspect
    if h > 0.9:
        h, w = 0.9, 0.9 * aspect
    f = _u(rng, 0.02, 0.06)
    zc = min(_u(rng, 1.35, 1.65), ctx.ceiling - h / 2 - f - 0.15)
    m.box(
        0,
        0.0125,
        zc - h / 2 - f,
        w + 2 * f,
        0.025,
        h + 2 * f,
        "picture",
        _pick(rng, ["wood", "metal", "painted"]),
    )
    m.box(0, 0.015, zc - h / 2, w, 0.03, h, "picture", f"photo:{photo}")
    return m


def _screen(m: Model, rng, w: float, z0: float, y: float, sub: int) -> float:
    """A television panel (bezel and picture) with its back at ``y``; returns its height."""
    h = w * 9 / 16
    content = f"screen:{_pick(rng, sorted(PHOTO_ASPECT))}" if rng.random() < 0.7 else "screen_off"
    m.box(0, y + 0.025, z0, w + 0.03, 0.05, h + 0.03, "television", "metal#dark", sub)
    m.box(0, y + 0.0275, z0 + 0.015, w, 0.055, h, "television", content, sub)
    return h


def wall_tv(rng, ctx: BuildContext) -> Model:
    m = Model("wall_tv")
    w = _u(rng, 0.8, 1.4)
    zc = min(_u(rng, 1.2, 1.5), ctx.ceiling - w * 9 / 32 - 0.2)
    _screen(m, rng, w, zc - w * 9 / 32, 0.0, 0)
    return m


def tv_on_stand(rng, ctx: BuildContext, max_width: float = 1.2) -> Model:
    m = Model("tv")
    w = min(_u(rng, 0.6, 1.3), max_width)
    m.box(0, 0, 0, w * 0.35, 0.2, 0.02, "television", "metal#dark")
    m.box(0, 0, 0.02, 0.06, 0.04, 0.1, "television", "metal#dark")
    _screen(m, rng, w, 0.1, -0.025, 0)
    return m


def tv_unit(rng, ctx: BuildContext) -> Model:
    """A low cabinet with a television on it."""
    m = Model("tv_unit", access=1.0)
    cab = low_cabinet(rng, ctx)
    m.add(cab)
    top = cab.tops[0]
    m.tops.clear()
    m.add(tv_on_stand(rng, ctx, max_width=2 * top.half[0] + 0.1), 0, 0, z=top.z)
    return m


def mirror(rng, ctx: BuildContext) -> Model:
    m = Model("mirror")
    w, h = _u(rng, 0.4, 0.7), _u(rng, 0.6, 1.5)
    z0 = min(_u(rng, 0.4, 1.1), ctx.ceiling - h - 0.2)
    m.box(0, 0.01, z0 - 0.03, w + 0.06, 0.02, h + 0.06, "mirror", _pick(rng, ["wood", "metal", "painted"]))
    m.box(0, 0.0125, z0, w, 0.025, h, "mirror", "mirror")
    return m


# ----------------------------------------------------------------------------------------------------
# Lamps, plants, small things


def floor_lamp(rng, ctx: BuildContext) -> Model:
    m = Model("floor_lamp")
    pole = _u(rng, 1.3, 1.6)
    m.cyl(0, 0, 0, 0.03, _u(rng, 0.12, 0.16), "lamp", "metal")
    m.cyl(0, 0, 0.03, pole, 0.012, "lamp", "metal")
    r, sh = _u(rng, 0.15, 0.25), _u(rng, 0.2, 0.32)
    if rng.random() < 0.7:
        m.cyl(0, 0, pole, sh, r, "lamp", "lampshade")
    else:
        m.ell(0, 0, pole + sh / 2, r, r, sh / 2, "lamp", "lampshade")
    m.lights.append(np.array([0.0, 0.0, pole + sh / 2]))
    return m


def table_lamp(rng, ctx: BuildContext) -> Model:
    m = Model("table_lamp")
    m.cyl(0, 0, 0, 0.03, _u(rng, 0.06, 0.09), "lamp", "metal")
    body = _u(rng, 0.15, 0.3)
    if rng.random() < 0.5:
        m.cyl(0, 0, 0.03, body, _u(rng, 0.015, 0.05), "lamp", _pick(rng, ["ceramic", "metal", "plastic"]))
    else:
        r = _u(rng, 0.05, 0.09)
        m.ell(0, 0, 0.03 + body / 2, r, r, body / 2, "lamp", _pick(rng, ["ceramic", "plastic"]))
    r, sh = _u(rng, 0.1, 0.17), _u(rng, 0.13, 0.22)
    m.cyl(0, 0, 0.03 + body, sh, r, "lamp", "lampshade")
    m.lights.append(np.array([0.0, 0.0, 0.03 + body + sh / 2]))
    return m


def desk_lamp(rng, ctx: BuildContext) -> Model:
    m = Model("desk_lamp")
    m.cyl(0, 0, 0, 0.02, 0.07, "lamp", "metal#dark")
    arm = _u(rng, 0.28, 0.4)
    m.box(0, 0, 0.02, 0.02, 0.02, arm, "lamp", "metal")
    reach = _u(rng, 0.2, 0.3)
    m.box(0, reach / 2, 0.02 + arm, 0.02, reach, 0.02, "lamp", "metal")
    m.ell(0, reach, arm - 0.02, 0.07, 0.05, 0.05, "lamp", "metal#dark")
    m.lights.append(np.array([0.0, reach, arm - 0.1]))
    return m


def ceiling_lamp(rng, ctx: BuildContext) -> Model:
    m = Model("ceiling_lamp")
    r, h = _u(rng, 0.15, 0.3), _u(rng, 0.05, 0.1)
    if rng.random() < 0.6:
        m.cyl(0, 0, ctx.ceiling - h, h, r, "lamp", "lampshade")
    else:
        m.ell(0, 0, ctx.ceiling, r, r, h, "lamp", "lampshade")
    m.lights.append(np.array([0.0, 0.0, ctx.ceiling - h - 0.1]))
    return m


def plant(rng, ctx: BuildContext) -> Model:
    m = Model("plant")
    r, ph = _u(rng, 0.12, 0.22), _u(rng, 0.2, 0.4)
    m.cyl(0, 0, 0, ph, r, "otherprop", _pick(rng, ["terracotta", "plastic", "ceramic"]))
    stem = _u(rng, 0.1, 0.5)
    m.cyl(0, 0, ph, stem, 0.015, "otherprop", "wood#stem")
    for _ in range(int(rng.integers(1, 4))):
        rx = _u(rng, 0.15, 0.3)
        rz = _u(rng, 0.15, 0.35)
        m.ell(
            _u(rng, -0.08, 0.08),
            _u(rng, -0.08, 0.08),
            ph + stem + rz * 0.6,
            rx,
            rx * _u(rng, 0.8, 1.2),
            rz,
            "otherprop",
            "plant",
        )
    return m


def small_plant(rng, ctx: BuildContext, max_height: float = 0.4) -> Model:
    m = Model("small_plant")
    r, ph = _u(rng, 0.05, 0.08), _u(rng, 0.07, 0.12)
    m.cyl(0, 0, 0, ph, r, "otherprop", _pick(rng, ["terracotta", "ceramic"]))
    rz = max(0.03, min(_u(rng, 0.06, 0.14), (max_height - ph) / 1.7))
    m.ell(0, 0, ph + rz * 0.7, r * 1.5, r * 1.5, rz, "otherprop", "plant")
    return m


def box_stack(rng, ctx: BuildContext) -> Model:
    m = Model("boxes")
    z = 0.0
    w, d = _u(rng, 0.3, 0.6), _u(rng, 0.25, 0.5)
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        h = _u(rng, 0.15, 0.45)
        _storage_box(m, rng, _u(rng, -0.03, 0.03), _u(rng, -0.03, 0.03), z, w, d, h, yaw=_u(rng, -0.3, 0.3))
        z += h  # the next box stands on this one (covering its tape, if any)
        w, d = w * _u(rng, 0.7, 0.95), d * _u(rng, 0.7, 0.95)
    return m


def small_box(rng, ctx: BuildContext) -> Model:
    m = Model("small_box")
    _storage_box(m, rng, 0, 0, 0, _u(rng, 0.1, 0.3), _u(rng, 0.1, 0.25), _u(rng, 0.06, 0.2))
    return m


def bag(rng, ctx: BuildContext) -> Model:
    m = Model("bag")
    w, d, h = _u(rng, 0.3, 0.45), _u(rng, 0.12, 0.2), _u(rng, 0.25, 0.4)
    material = _pick(rng, ["fabric", "leather"])
    if rng.random() < 0.5:
        m.box(0, 0, 0, w, d, h, "bag", material)
    else:
        m.ell(0, 0, h / 2, w / 2, d / 2, h / 2, "bag", material)
    for sx in (-1, 1):
        m.box(sx * w * 0.25, 0, h - 0.02, 0.015, 0.015, 0.14, "bag", material + "#strap")
    m.box(0, 0, h + 0.12, w * 0.5 + 0.015, 0.015, 0.015, "bag", material + "#strap")
    return m


def rug(rng, ctx: BuildContext, bathroom: bool = False) -> Model:
    m = Model("rug")
    w, d = (_u(rng, 0.5, 0.9), _u(rng, 0.4, 0.6)) if bathroom else (_u(rng, 1.2, 2.6), _u(rng, 0.8, 1.8))
    m.box(0, 0, 0, w, d, 0.012, "floor mat", "carpet")
    return m


def paper_stack(rng, ctx: BuildContext) -> Model:
    m = Model("paper")
    z = 0.0
    for _ in range(int(rng.integers(1, 4))):
        m.box(
            _u(rng, -0.02, 0.02),
            _u(rng, -0.02, 0.02),
            z,
            0.21,
            0.297,
            0.003,
            "paper",
            "paper",
            yaw=_u(rng, -0.3, 0.3),
        )
        z += 0.003
    return m


def book_stack(rng, ctx: BuildContext) -> Model:
    m = Model("book_stack")
    z = 0.0
    for k in range(int(rng.integers(2, 6))):
        h = _u(rng, 0.02, 0.05)
        m.box(
            _u(rng, -0.02, 0.02),
            _u(rng, -0.02, 0.02),
            z,
            _u(rng, 0.13, 0.2),
            _u(rng, 0.18, 0.26),
            h,
            "books",
            f"book#{k}",
            yaw=_u(rng, -0.25, 0.25),
        )
        z += h
    return m


Builder = Callable[..., Model]

BUILDERS: Dict[str, Builder] = {
    f.__name__: f
    for f in (
        bed_set, bed, night_stand, chair, office_chair, armchair, sofa, sofa_set, coffee_table, side_table,
        dining_set, dresser, wardrobe, low_cabinet, file_cabinet, bookshelf, wall_shelves, desk, desk_set,
        whiteboard, refrigerator, counter_run, toilet, vanity, bathtub, towel, door, window, picture, wall_tv,
        tv_unit, mirror, floor_lamp, table_lamp, desk_lamp, ceiling_lamp, plant, small_plant, box_stack,
        small_box, bag, rug, paper_stack, book_stack,
    )
}  # fmt: skip
"""Every model builder by name."""


def build(name: str, rng: np.random.Generator, ctx: BuildContext, **kwargs) -> Model:
    """Build catalogue model ``name``."""
    if name == "meeting_set":
        return dining_set(rng, ctx, meeting=True)
    if name == "bath_mat":
        return rug(rng, ctx, bathroom=True)
    return BUILDERS[name](rng, ctx, **kwargs)
