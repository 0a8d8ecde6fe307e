"""A deterministic synthetic aerial data set in DOTA format (the embedded demo's data).

Each tile is a top-down scene: textured ground (multi-scale smooth noise), roads (straight or
curved asphalt bands with lane markings), parking lots with crowded rows of cars, and rotated
objects of four classes with distinct shapes, sizes and colours:

* ``small-vehicle``: bright cars (white, silver, red, blue, yellow), about 15-20 x 8-10 px,
  with a dark windscreen; in parking rows, on roads and scattered;
* ``large-vehicle``: dark trucks with a light cab, about 30-44 x 12-15 px, mostly on roads;
* ``storage-tank``: light discs with a darker roof ring, 18-32 px across, often in groups
  (annotated by the enclosing axis-aligned square, as in DOTA);
* ``plane``: white cross shapes (fuselage, wings, tail), 36-52 px.

Objects cast a short shadow, never overlap and lie inside the tile; a small fraction is drawn
with low contrast and marked difficult. Shapes are drawn with Pillow on a 4x supersampled
canvas and reduced (box filter), which anti-aliases their edges.

Everything follows from :class:`SyntheticConfig` (the seed included): tile ``i`` of a split is
drawn from its own random stream, so the data set is identical on every machine and run.
:class:`SyntheticSceneConfig` makes large scenes (e.g. 2048 x 1536 px) the same way, for the
split -> train on patches -> predict on whole images path.
:func:`prepare_synthetic_dota` writes it once into the user cache and returns its folder; it
is read back through :class:`~dbf_ext.data.DotaDetectionDataset` like real DOTA data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import Progress

from dbf_ext.data.dota import write_dota_labels

SYNTHETIC_CLASSES = ("small-vehicle", "large-vehicle", "storage-tank", "plane")
FORMAT_VERSION = "synthetic-v1"
SCENE_FORMAT_VERSION = "synthetic-scenes-v1"
COMPLETE_MARKER = "COMPLETE.json"
SPLITS = ("train", "val")

_SUPERSAMPLE = 4
_EDGE_MARGIN = 2.0  # px between an object and the tile border
_OBJECT_GAP = 2.0  # px between two objects
_STALE_TEMP_SECONDS = 3600.0

_GROUND_COLOURS = ((96, 112, 74), (150, 136, 106), (124, 104, 84), (140, 140, 134))
_ROAD_COLOUR = (88, 88, 93)
_LOT_COLOUR = (104, 104, 108)
_MARKING_COLOUR = (225, 225, 210)
_CAR_COLOURS = ((238, 238, 238), (192, 194, 198), (200, 40, 40), (48, 78, 196), (232, 200, 60))
_TRUCK_COLOURS = ((38, 40, 44), (58, 48, 40), (36, 58, 44))
_CAB_COLOUR = (196, 196, 190)
_GLASS_COLOUR = (40, 48, 60)
_TANK_COLOUR = (226, 226, 220)
_TANK_ROOF_COLOUR = (178, 178, 172)
_PLANE_COLOUR = (236, 236, 240)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic set (all of them enter the cache folder's hash).

    Attributes:
        tile_size: tile width and height in pixels.
        train_tiles, val_tiles: number of tiles per split.
        min_objects, max_objects: objects per tile (inclusive range; a crowded tile may stop
            short of its draw when no free space is left).
        difficult_fraction: probability that an object is drawn with low contrast and
            marked difficult.
        seed: random seed of the whole set.
    """

    tile_size: int = 256
    train_tiles: int = 48
    val_tiles: int = 16
    min_objects: int = 5
    max_objects: int = 20
    difficult_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tile_size < 96:
            raise ValueError(f"tile_size must be >= 96 px (objects are up to 52 px), got {self.tile_size}")
        if self.train_tiles < 0 or self.val_tiles < 0:
            raise ValueError("train_tiles and val_tiles must be >= 0")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 <= self.difficult_fraction <= 1:
            raise ValueError(f"difficult_fraction must be in [0, 1], got {self.difficult_fraction}")

    format_version: ClassVar[str] = FORMAT_VERSION
    kind: ClassVar[str] = "tiles"

    def num_tiles(self, split: str) -> int:
        return {"train": self.train_tiles, "val": self.val_tiles}[split]

    num_images = num_tiles

    def params_hash(self) -> str:
        """Short hash of the format version and every parameter: the cache folder's name."""
        return _params_hash(self)

    def render(self, split: str, index: int) -> SyntheticTile:
        return render_synthetic_tile(self, split, index)


# Objects are placed, and textures sized, per tile of this area in a large scene.
_TILE_AREA = 256 * 256


@dataclass(frozen=True)
class SyntheticSceneConfig:
    """Parameters of the synthetic set of large scenes (all of them enter the folder's hash).

    A scene is drawn like a tile, over a larger ground: per 256 x 256 px of its area it gets a
    tile's share of objects, parking lots, tank farms and planes; roads run across the whole
    scene (about one per ``sqrt(area / 256^2)``). Objects lie anywhere in it, so they cross the
    borders of the patches the scene is split into.

    Attributes:
        width, height: scene size in pixels (e.g. 2048 x 1536, like a DOTA image).
        train_scenes, val_scenes: number of scenes per split.
        min_objects, max_objects: objects per 256 x 256 px of scene (inclusive range).
        difficult_fraction: probability that an object is drawn with low contrast and
            marked difficult.
        seed: random seed of the whole set.
    """

    width: int = 2048
    height: int = 1536
    train_scenes: int = 4
    val_scenes: int = 2
    min_objects: int = 5
    max_objects: int = 20
    difficult_fraction: float = 0.05
    seed: int = 0

    format_version: ClassVar[str] = SCENE_FORMAT_VERSION
    kind: ClassVar[str] = "scenes"

    def __post_init__(self) -> None:
        if min(self.width, self.height) < 96:
            raise ValueError(f"scenes must be >= 96 px a side (objects are up to 52 px), got "
                             f"{self.width} x {self.height}")
        if self.train_scenes < 0 or self.val_scenes < 0:
            raise ValueError("train_scenes and val_scenes must be >= 0")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 <= self.difficult_fraction <= 1:
            raise ValueError(f"difficult_fraction must be in [0, 1], got {self.difficult_fraction}")

    def num_images(self, split: str) -> int:
        return {"train": self.train_scenes, "val": self.val_scenes}[split]

    def params_hash(self) -> str:
        """Short hash of the format version and every parameter: the cache folder's name."""
        return _params_hash(self)

    def render(self, split: str, index: int) -> SyntheticTile:
        return render_synthetic_scene(self, split, index)


def _params_hash(config: SyntheticConfig | SyntheticSceneConfig) -> str:
    text = json.dumps({"version": config.format_version, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SyntheticTile:
    """One rendered tile or scene: ``image`` uint8 ``(H, W, 3)``, ``polygons`` float64 ``(K, 8)``,
    ``class_names`` (K names), ``difficult`` bool ``(K,)``."""

    image: np.ndarray
    polygons: np.ndarray
    class_names: tuple[str, ...]
    difficult: np.ndarray


def tile_image_id(split: str, index: int) -> str:
    """Image id of tile (or scene) ``index`` of ``split``: ``"train_0007"`` (unique across splits)."""
    return f"{split}_{index:04d}"


def _rect_corners(cx: float, cy: float, w: float, h: float, theta: float) -> np.ndarray:
    """``(4, 2)`` corners of a rotated rectangle (the ``w`` edge along ``(cos, sin)``)."""
    c, s = math.cos(theta), math.sin(theta)
    half_w = np.array([c, s]) * w / 2
    half_h = np.array([-s, c]) * h / 2
    centre = np.array([cx, cy])
    return np.stack((centre + half_w + half_h, centre + half_w - half_h,
                     centre - half_w - half_h, centre - half_w + half_h))


def _convex_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two convex polygons ``(n, 2)`` overlap (separating axis test)."""
    if np.any(a.max(axis=0) <= b.min(axis=0)) or np.any(b.max(axis=0) <= a.min(axis=0)):
        return False  # separated along x or y: the common case, decided cheaply
    for poly in (a, b):
        edges = np.roll(poly, -1, axis=0) - poly
        for normal in np.stack((-edges[:, 1], edges[:, 0]), axis=1):
            pa, pb = a @ normal, b @ normal
            if pa.max() <= pb.min() or pb.max() <= pa.min():
                return False
    return True


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells_y: int, cells_x: int) -> np.ndarray:
    """``(height, width)`` noise, bilinear interpolation of a ``(cells_y + 1, cells_x + 1)``
    random grid."""
    grid = rng.standard_normal((cells_y + 1, cells_x + 1))

    def along_axis0(values: np.ndarray, cells: int, size: int) -> np.ndarray:
        position = np.linspace(0, cells, size)
        lower = np.minimum(position.astype(int), cells - 1)
        frac = (position - lower)[:, None]
        return values[lower] * (1 - frac) + values[lower + 1] * frac

    return along_axis0(along_axis0(grid, cells_y, height).T, cells_x, width).T


class _OccupancyGrid:
    """The objects placed so far, indexed by the grid cells their bounding boxes touch, so a
    free-space test looks only at objects near the candidate (large scenes hold thousands)."""

    _CELL = 64.0  # px

    def __init__(self) -> None:
        self.corners: list[np.ndarray] = []
        self._cells: dict[tuple[int, int], list[int]] = {}

    def _cell_range(self, corners: np.ndarray):
        (x0, y0), (x1, y1) = (np.floor(corners.min(axis=0) / self._CELL).astype(int),
                              np.floor(corners.max(axis=0) / self._CELL).astype(int))
        return ((cx, cy) for cx in range(x0, x1 + 1) for cy in range(y0, y1 + 1))

    def add(self, corners: np.ndarray) -> None:
        for cell in self._cell_range(corners):
            self._cells.setdefault(cell, []).append(len(self.corners))
        self.corners.append(corners)

    def overlaps(self, corners: np.ndarray) -> bool:
        """Whether ``corners`` overlap a placed object (objects whose boxes share no cell with
        its box are separated along x or y, which the overlap test decides first anyway)."""
        near = {index for cell in self._cell_range(corners) for index in self._cells.get(cell, ())}
        return any(_convex_overlap(corners, self.corners[index]) for index in sorted(near))


@dataclass(frozen=True)
class _Layout:
    """The size of a scene and how much goes into it.

    ``units``: how many tiles' worth of parking lots, tank farms and lone planes it gets (1 for
    a tile); ``objects``: the range of its object budget; ``texture_scale``: the ground
    texture's grid cells per axis relative to a tile's; ``road_groups``: how many times up to
    two roads are drawn; ``road_points``: points along each road (where vehicles stand).
    """

    width: int
    height: int
    objects: tuple[int, int]
    difficult_fraction: float
    units: int = 1
    texture_scale: tuple[float, float] = (1.0, 1.0)
    road_groups: int = 1
    road_points: int = 48


class _Scene:
    """Plans and draws one tile or large scene: free-space bookkeeping, supersampled canvas,
    annotations."""

    def __init__(self, rng: np.random.Generator, layout: _Layout):
        self.rng = rng
        self.layout = layout
        self.width, self.height = layout.width, layout.height
        self.extent = np.array([layout.width, layout.height], dtype=np.float64)
        self.budget = int(rng.integers(layout.objects[0], layout.objects[1] + 1))
        self.ground = np.array(_GROUND_COLOURS[rng.integers(len(_GROUND_COLOURS))], dtype=np.float64)
        angle = rng.uniform(0, 2 * math.pi)
        self.shadow_dir = np.array([math.cos(angle), math.sin(angle)])
        self.occupied = _OccupancyGrid()  # corners of the objects placed so far
        self.polygons: list[np.ndarray] = []
        self.class_names: list[str] = []
        self.difficult: list[bool] = []
        self.roads: list[tuple[np.ndarray, np.ndarray, float]] = []  # points, tangents, width
        scale_x, scale_y = layout.texture_scale
        texture = sum(
            _smooth_noise(rng, self.height, self.width, max(1, round(cells * scale_y)),
                          max(1, round(cells * scale_x))) * amplitude
            for cells, amplitude in ((3, 12), (10, 7), (32, 4))
        )
        tint = rng.uniform(-6, 6, size=3)
        ground = np.clip(self.ground + tint + texture[..., None], 0, 255).astype(np.uint8)
        # Nearest upsampling: the final box-filter reduction gives the ground back unchanged.
        self.canvas = Image.fromarray(ground).resize(
            (self.width * _SUPERSAMPLE, self.height * _SUPERSAMPLE), Image.NEAREST)
        self.draw = ImageDraw.Draw(self.canvas)

    # ----- geometry -------------------------------------------------------------------------
    def _scaled(self, points: np.ndarray) -> list[tuple[float, float]]:
        return [tuple(p) for p in (np.asarray(points) * _SUPERSAMPLE).tolist()]

    def inside(self, corners: np.ndarray) -> bool:
        return bool(np.all((corners >= _EDGE_MARGIN) & (corners <= self.extent - _EDGE_MARGIN)))

    def is_free(self, corners: np.ndarray) -> bool:
        return self.inside(corners) and not self.occupied.overlaps(_grow(corners, _OBJECT_GAP))

    @property
    def full(self) -> bool:
        return len(self.class_names) >= self.budget

    # ----- drawing ----------------------------------------------------------------------------
    def colour(self, rgb, difficult: bool) -> tuple[int, int, int]:
        """``rgb`` jittered; a difficult object is blended most of the way into the ground."""
        value = np.asarray(rgb, dtype=np.float64) + self.rng.uniform(-10, 10, size=3)
        if difficult:
            value = 0.3 * value + 0.7 * self.ground
        return tuple(int(v) for v in np.clip(value, 0, 255))

    def shadow_colour(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.ground * 0.55)

    def polygon(self, corners: np.ndarray, fill) -> None:
        self.draw.polygon(self._scaled(corners), fill=fill)

    def ellipse(self, cx: float, cy: float, radius: float, fill) -> None:
        box = np.array([cx - radius, cy - radius, cx + radius, cy + radius]) * _SUPERSAMPLE
        self.draw.ellipse(box.tolist(), fill=fill)

    def add_object(self, name: str, corners: np.ndarray, difficult: bool) -> None:
        self.occupied.add(corners)
        self.polygons.append(corners.reshape(8))
        self.class_names.append(name)
        self.difficult.append(difficult)

    def draw_difficult(self) -> bool:
        return bool(self.rng.random() < self.layout.difficult_fraction)

    # ----- objects ----------------------------------------------------------------------------
    def place_vehicle(self, name: str, cx: float, cy: float, theta: float) -> bool:
        """Draws a car or truck facing ``theta`` if the spot is free; True when placed."""
        rng = self.rng
        if name == "small-vehicle":
            w, h = rng.uniform(15, 20), rng.uniform(8, 10)
        else:
            w, h = rng.uniform(30, 44), rng.uniform(12, 15)
        corners = _rect_corners(cx, cy, w, h, theta)
        if self.full or not self.is_free(corners):
            return False
        difficult = self.draw_difficult()
        shadow = corners + self.shadow_dir * 2.5
        self.polygon(shadow, self.shadow_colour())
        forward = np.array([math.cos(theta), math.sin(theta)])
        if name == "small-vehicle":
            self.polygon(corners, self.colour(_CAR_COLOURS[rng.integers(len(_CAR_COLOURS))], difficult))
            glass = _rect_corners(*(np.array([cx, cy]) + forward * w * 0.18), w * 0.16, h * 0.8, theta)
            self.polygon(glass, self.colour(_GLASS_COLOUR, difficult))
        else:
            self.polygon(corners, self.colour(_TRUCK_COLOURS[rng.integers(len(_TRUCK_COLOURS))], difficult))
            cab = _rect_corners(*(np.array([cx, cy]) + forward * w * 0.4), w * 0.2, h, theta)
            self.polygon(cab, self.colour(_CAB_COLOUR, difficult))
        self.add_object(name, corners, difficult)
        return True

    def place_tank(self, cx: float, cy: float, diameter: float) -> bool:
        corners = _rect_corners(cx, cy, diameter, diameter, 0.0)
        if self.full or not self.is_free(corners):
            return False
        difficult = self.draw_difficult()
        radius = diameter / 2
        shadow_centre = np.array([cx, cy]) + self.shadow_dir * radius * 0.25
        self.ellipse(*shadow_centre, radius, self.shadow_colour())
        self.ellipse(cx, cy, radius, self.colour(_TANK_COLOUR, difficult))
        self.ellipse(cx, cy, radius * 0.78, self.colour(_TANK_ROOF_COLOUR, difficult))
        self.ellipse(cx, cy, radius * 0.62, self.colour(_TANK_COLOUR, difficult))
        self.add_object("storage-tank", corners, difficult)
        return True

    def place_plane(self, cx: float, cy: float, theta: float) -> bool:
        length = self.rng.uniform(36, 52)
        span = length * self.rng.uniform(0.9, 1.05)
        corners = _rect_corners(cx, cy, length, span, theta)
        if self.full or not self.is_free(corners):
            return False
        difficult = self.draw_difficult()
        forward = np.array([math.cos(theta), math.sin(theta)])
        centre = np.array([cx, cy])
        parts = (  # (offset along the fuselage, length, width) of each rectangle
            (0.0, length, length * 0.13),  # fuselage
            (length * 0.05, length * 0.2, span),  # wings
            (-length * 0.42, length * 0.12, span * 0.38),  # tail
        )
        rects = [_rect_corners(*(centre + forward * offset), part_len, width, theta)
                 for offset, part_len, width in parts]
        for rect in rects:
            self.polygon(rect + self.shadow_dir * 4, self.shadow_colour())
        fill = self.colour(_PLANE_COLOUR, difficult)
        for rect in rects:
            self.polygon(rect, fill)
        self.add_object("plane", corners, difficult)
        return True

    # ----- layout -----------------------------------------------------------------------------
    def add_road(self) -> None:
        """A straight or curved band from one side to another, with a dashed centre line."""
        rng = self.rng
        sides = rng.choice(4, size=2, replace=False)
        ends = [_point_on_side(side, rng.uniform(0.15, 0.85), self.width, self.height) for side in sides]
        bend = 0.0 if rng.random() < 0.5 else rng.uniform(-0.3, 0.3) * min(self.width, self.height)
        middle = (ends[0] + ends[1]) / 2
        chord = ends[1] - ends[0]
        control = middle + np.array([-chord[1], chord[0]]) / np.linalg.norm(chord) * bend
        t = np.linspace(0, 1, self.layout.road_points)[:, None]
        points = (1 - t) ** 2 * ends[0] + 2 * t * (1 - t) * control + t**2 * ends[1]
        tangents = 2 * (1 - t) * (control - ends[0]) + 2 * t * (ends[1] - control)
        tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
        width = rng.uniform(20, 28)
        scaled = self._scaled(points)
        self.draw.line(scaled, fill=self.colour(_ROAD_COLOUR, False), width=int(width * _SUPERSAMPLE), joint="curve")
        for start in range(0, len(scaled) - 1, 4):  # dashes: every other pair of segments
            self.draw.line(scaled[start:start + 3], fill=_MARKING_COLOUR, width=_SUPERSAMPLE)
        self.roads.append((points, tangents, width))

    def add_parking_lot(self) -> None:
        """Rows of parking slots at a common angle, most of them taken by cars (crowded)."""
        rng = self.rng
        rows, slots = int(rng.integers(1, 3)), int(rng.integers(4, 9))
        pitch, depth = rng.uniform(12.5, 14.0), 22.0
        theta = rng.uniform(-math.pi / 2, math.pi / 2)
        lot_w, lot_h = slots * pitch + 4, rows * depth + 4
        margin = math.hypot(lot_w, lot_h) / 2 + _EDGE_MARGIN
        if margin * 2 >= min(self.width, self.height):
            return
        cx, cy = rng.uniform(margin, self.extent - margin)
        lot = _rect_corners(cx, cy, lot_w, lot_h, theta)
        if self.occupied.overlaps(lot):
            return
        self.polygon(lot, self.colour(_LOT_COLOUR, False))
        along = np.array([math.cos(theta), math.sin(theta)])
        across = np.array([-math.sin(theta), math.cos(theta)])
        origin = np.array([cx, cy]) - along * slots * pitch / 2 - across * rows * depth / 2
        for row in range(rows):
            for slot in range(slots + 1):  # slot dividers
                start = origin + along * slot * pitch + across * row * depth
                self.draw.line(self._scaled([start, start + across * depth]), fill=_MARKING_COLOUR, width=2)
        # Cars park across the row: their long side is perpendicular to the lot's long side.
        car_theta = theta + math.pi / 2 + (math.pi if rng.random() < 0.5 else 0.0)
        for row in range(rows):
            for slot in range(slots):
                if rng.random() < 0.8:
                    centre = origin + along * (slot + 0.5) * pitch + across * (row + 0.5) * depth
                    jitter = rng.uniform(-0.5, 0.5, size=2)
                    self.place_vehicle("small-vehicle", *(centre + jitter), car_theta + rng.uniform(-0.05, 0.05))

    def add_tank_group(self) -> None:
        """2-6 storage tanks on a grid (a tank farm)."""
        rng = self.rng
        diameter = rng.uniform(18, 32)
        cols, rows = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        pitch = diameter + rng.uniform(5, 10)
        # Small tiles fit fewer tanks per row and column (default tiles always fit the draw).
        cols = min(cols, 1 + int((self.width - 2 * diameter) // pitch))
        rows = min(rows, 1 + int((self.height - 2 * diameter) // pitch))
        x0 = rng.uniform(diameter, self.width - diameter - (cols - 1) * pitch)
        y0 = rng.uniform(diameter, self.height - diameter - (rows - 1) * pitch)
        for row in range(rows):
            for col in range(cols):
                self.place_tank(x0 + col * pitch, y0 + row * pitch, diameter * rng.uniform(0.95, 1.05))

    def add_road_vehicle(self) -> None:
        """A car or truck in a lane of a random road, facing along it."""
        points, tangents, width = self.roads[self.rng.integers(len(self.roads))]
        i = int(self.rng.integers(4, len(points) - 4))
        lane = width / 4 if self.rng.random() < 0.5 else -width / 4
        normal = np.array([-tangents[i, 1], tangents[i, 0]])
        cx, cy = points[i] + normal * lane
        theta = math.atan2(tangents[i, 1], tangents[i, 0]) + (math.pi if lane < 0 else 0.0)
        name = "large-vehicle" if self.rng.random() < 0.45 else "small-vehicle"
        self.place_vehicle(name, cx, cy, theta)

    def add_scattered(self) -> None:
        """One object of a random class at a random free spot."""
        rng = self.rng
        cx, cy = rng.uniform(0, self.extent)
        theta = rng.uniform(-math.pi, math.pi)
        kind = rng.choice(4, p=(0.3, 0.3, 0.25, 0.15))
        if kind == 0:
            self.place_vehicle("small-vehicle", cx, cy, theta)
        elif kind == 1:
            self.place_vehicle("large-vehicle", cx, cy, theta)
        elif kind == 2:
            self.place_tank(cx, cy, rng.uniform(18, 32))
        else:
            self.place_plane(cx, cy, theta)

    def render(self) -> SyntheticTile:
        rng = self.rng
        for _ in range(self.layout.road_groups):  # roads first: nothing may be painted over objects
            for _ in range(rng.choice(3, p=(0.25, 0.5, 0.25))):
                self.add_road()
        for _ in range(self.layout.units):
            if rng.random() < 0.35 and not self.full:
                self.place_plane(*rng.uniform(0, self.extent), rng.uniform(-math.pi, math.pi))
            if rng.random() < 0.5:
                self.add_parking_lot()
            if rng.random() < 0.4:
                self.add_tank_group()
        for _ in range(4 * self.budget):  # bounded: a crowded tile may have no space left
            if self.full:
                break
            if self.roads and rng.random() < 0.5:
                self.add_road_vehicle()
            else:
                self.add_scattered()
        small = self.canvas.reduce(_SUPERSAMPLE)
        noisy = np.asarray(small, dtype=np.float64) + rng.normal(0, 3, size=(self.height, self.width, 3))
        # Two decimals keep label files short; such rounding moves a corner by <= 0.005 px.
        polygons = np.round(np.array(self.polygons, dtype=np.float64).reshape(-1, 8), 2)
        return SyntheticTile(
            np.clip(noisy, 0, 255).astype(np.uint8), polygons, tuple(self.class_names),
            np.array(self.difficult, dtype=bool),
        )


def _grow(corners: np.ndarray, distance: float) -> np.ndarray:
    """A convex polygon pushed out from its centroid by about ``distance`` (for gaps)."""
    centre = corners.mean(axis=0)
    offset = corners - centre
    return centre + offset * (1 + distance / np.linalg.norm(offset, axis=1, keepdims=True))


def _point_on_side(side: int, fraction: float, width: int, height: int) -> np.ndarray:
    """A point on side 0 (top), 1 (right), 2 (bottom) or 3 (left), ``fraction`` of the way along it."""
    along = fraction * (width if side in (0, 2) else height)
    return np.array(((along, 0.0), (width, along), (along, height), (0.0, along))[side], dtype=np.float64)


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def render_synthetic_tile(config: SyntheticConfig, split: str, index: int) -> SyntheticTile:
    """Renders tile ``index`` of ``split`` (deterministic in ``config``, ``split``, ``index``)."""
    rng = np.random.default_rng([config.seed, _split_index(split), index])
    layout = _Layout(config.tile_size, config.tile_size, (config.min_objects, config.max_objects),
                     config.difficult_fraction)
    return _Scene(rng, layout).render()


def render_synthetic_scene(config: SyntheticSceneConfig, split: str, index: int) -> SyntheticTile:
    """Renders large scene ``index`` of ``split`` (deterministic in ``config``, ``split``,
    ``index``; its random stream is not any tile's)."""
    rng = np.random.default_rng([config.seed, _split_index(split), index, 1])
    units = max(1, round(config.width * config.height / _TILE_AREA))
    side = math.sqrt(_TILE_AREA)
    layout = _Layout(
        config.width, config.height, (config.min_objects * units, config.max_objects * units),
        config.difficult_fraction, units=units, texture_scale=(config.width / side, config.height / side),
        road_groups=max(1, round(math.sqrt(units))),
        road_points=48 * max(1, math.ceil(max(config.width, config.height) / side)),
    )
    return _Scene(rng, layout).render()


def generate_synthetic_dota(
    out_dir: str | Path, config: SyntheticConfig | SyntheticSceneConfig | None = None, *, quiet: bool = False
) -> Path:
    """Writes the set to ``out_dir/{train,val}/{images,labelTxt}`` (PNG + DOTA labels): the
    tiles of a :class:`SyntheticConfig` (default) or the scenes of a
    :class:`SyntheticSceneConfig`.

    No caching (see :func:`prepare_synthetic_dota`); existing files are overwritten. A rich
    progress bar is shown on a terminal unless ``quiet``. Returns ``out_dir``.
    """
    config = config or SyntheticConfig()
    out_dir = Path(out_dir)
    console = Console(stderr=True)
    jobs = [(split, index) for split in SPLITS for index in range(config.num_images(split))]
    for split in SPLITS:
        for sub in ("images", "labelTxt"):
            (out_dir / split / sub).mkdir(parents=True, exist_ok=True)
    with Progress(console=console, disable=quiet or not console.is_terminal) as progress:
        task = progress.add_task(f"synthetic aerial {config.kind}", total=len(jobs))
        for split, index in jobs:
            tile = config.render(split, index)
            image_id = tile_image_id(split, index)
            # compress_level=1: about half the time of the default level, files ~13% larger.
            Image.fromarray(tile.image).save(out_dir / split / "images" / f"{image_id}.png", compress_level=1)
            write_dota_labels(out_dir / split / "labelTxt" / f"{image_id}.txt", tile.polygons, tile.class_names,
                              tile.difficult, header={"imagesource": config.format_version, "gsd": "null"})
            progress.advance(task)
    return out_dir


def default_cache_dir() -> Path:
    """``$DBF_EXT_CACHE``, else ``$XDG_CACHE_HOME/dbf_ext``, else ``~/.cache/dbf_ext``."""
    if os.environ.get("DBF_EXT_CACHE"):
        return Path(os.environ["DBF_EXT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dbf_ext"


def prepare_synthetic_dota(
    config: SyntheticConfig | SyntheticSceneConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    quiet: bool = False,
) -> Path:
    """The folder of the synthetic set, generating it on first use.

    The set lives in ``<cache_dir>/synthetic-v1/<params hash>/`` (tiles; large scenes of a
    :class:`SyntheticSceneConfig` in ``synthetic-scenes-v1/``; ``cache_dir`` defaults to
    :func:`default_cache_dir`) with ``train/`` and ``val/`` DOTA folders. It is generated in a
    temporary sibling folder whose completion marker (``COMPLETE.json``, the parameters) is
    written last, then renamed into place: an interrupted generation is never used and is
    redone on the next call, and processes racing to generate the same set all end up with
    one complete copy.

    Returns:
        The set's root, for ``DotaDetectionDataset(root, "train", classes=SYNTHETIC_CLASSES)``.
    """
    config = config or SyntheticConfig()
    parent = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    parent = parent / config.format_version
    root = parent / config.params_hash()
    if (root / COMPLETE_MARKER).is_file():
        return root
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_stale_temporaries(parent, root.name)
    temp = parent / f".{root.name}.tmp-{uuid.uuid4().hex}"
    try:
        generate_synthetic_dota(temp, config, quiet=quiet)
        marker = {"version": config.format_version, "params": asdict(config), "classes": list(SYNTHETIC_CLASSES)}
        (temp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if root.exists() and not (root / COMPLETE_MARKER).is_file():
            shutil.rmtree(root)  # an incomplete folder (e.g. copied by hand): replace it
        try:
            temp.rename(root)
        except OSError:
            if not (root / COMPLETE_MARKER).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return root


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Deletes leftovers of interrupted generations of ``name``: temporary folders in which no
    file was written for an hour (a running generation writes into its split folders)."""
    now = time.time()
    for temp in parent.glob(f".{name}.tmp-*"):
        folders = [temp, *(temp / split / sub for split in SPLITS for sub in ("images", "labelTxt"))]
        try:
            last_write = max(folder.stat().st_mtime for folder in folders if folder.exists())
        except (FileNotFoundError, ValueError):  # removed meanwhile by another process
            continue
        if now - last_write > _STALE_TEMP_SECONDS:
            shutil.rmtree(temp, ignore_errors=True)
