"""The anatomy of a synthetic chest in HU, before any disease or scanner: the part both phantom kinds share.

:func:`make_subject` draws one subject's body and lung sizes, inspiration and heart position;
:func:`render_anatomy` draws body outline with subcutaneous fat, ribs, sternum and spine, mediastinum, heart
and aorta, liver, a stomach gas bubble, the patient table and the two lungs with their diaphragm domes onto a
canonical :class:`Grid`; :func:`add_vessels_and_airways` grows the branching vessels and airways inside the
lungs and draws them in. The built-in phantoms (:mod:`lungmae_core.synthetic.phantoms`) and the experiment phantoms
(:mod:`lungmae_core.synthetic.experiment_phantoms`) then add their diseases to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from lungmae_core.volume import sample_linear

__all__ = ["AIR", "BLOOD", "BONE", "FAT", "MARROW", "SOFT", "TABLE", "Grid", "Subject", "add_vessels_and_airways",
           "draw_chest", "lung_box", "lung_vessels_and_airways", "make_subject", "render_anatomy", "smooth_noise"]

#: Tissue HU of the rendered anatomy.
AIR = -1000.0
FAT = -100.0
SOFT = 40.0
BLOOD = 45.0
BONE = 700.0
MARROW = 250.0
TABLE = 150.0


@dataclasses.dataclass
class Subject:
    """Anatomy of one subject in mm; x to the patient's left, y posterior, z superior (LPS, centred)."""

    body_ax: float
    body_ay: float
    body_cy: float
    fat: float
    wall: float
    z_base: float          # lowest lung point (costophrenic recess) above the first slice
    lung_h: float
    dome_h: float
    right_dome_extra: float
    medial: float
    heart: tuple[float, float, float, float, float, float]
    lung_shape_n: float
    inspiration: float
    parenchyma_hu: float
    stomach: tuple[float, float, float, float] | None
    rib_period: float
    rib_slope: float
    rib_phase: float

    def lung_geometry(self, side: int) -> tuple[float, float, float, float]:
        """(cx, cy, rx, ry) of the lung on ``side`` (-1 right, +1 left) at its widest, in mm."""
        lateral = self.body_ax - self.fat - self.wall
        medial = self.medial + (10.0 if side > 0 else 0.0)
        cx = side * (medial + lateral) / 2.0
        rx = (lateral - medial) / 2.0
        cav = self.body_ay - self.fat - self.wall
        cy = self.body_cy + 0.08 * cav
        ry = 0.93 * cav
        return cx, cy, rx, ry


def make_subject(rng: np.random.Generator, extent_mm: tuple[float, float, float], label: str,
                  severity: float) -> Subject:
    ez, ey, ex = extent_mm
    half = min(ex, ey) / 2.0
    body_ax = min(rng.uniform(140, 185), 0.47 * ex)
    body_ay = min(rng.uniform(0.62, 0.76) * body_ax, 0.40 * ey)
    inspiration = float(rng.uniform(0.0, 1.0))
    fat = rng.uniform(6, 26)
    lung_h = rng.uniform(195, 255) * (0.92 + 0.12 * inspiration)
    if label == "fibrosis":
        lung_h *= 1.0 - 0.15 * severity  # volume loss
    elif label == "emphysema":
        lung_h *= 1.0 + 0.10 * severity  # hyperinflation
    lung_h = min(lung_h, ez - 45.0)
    z_base = rng.uniform(20, max(21.0, ez - lung_h - 15.0))
    z_base = min(z_base, 0.25 * ez)
    parenchyma = -845.0 - 70.0 * (inspiration - 0.5) + rng.normal(0, 12)
    hx = rng.uniform(10, 45)
    heart = (hx, -0.3 * body_ay, z_base + rng.uniform(0.12, 0.22) * lung_h,
             rng.uniform(55, 70), rng.uniform(45, 58), rng.uniform(45, 58))
    stomach = None
    if rng.random() < 0.7:
        stomach = (rng.uniform(50, 80), -0.25 * body_ay, z_base - rng.uniform(15, 25), rng.uniform(15, 30))
    return Subject(
        body_ax=body_ax, body_ay=body_ay, body_cy=rng.uniform(-0.03, 0.03) * half, fat=fat,
        wall=rng.uniform(14, 20), z_base=z_base, lung_h=lung_h, dome_h=rng.uniform(35, 60) * (1.1 - 0.3 * inspiration),
        right_dome_extra=rng.uniform(5, 20), medial=rng.uniform(22, 34),
        heart=heart, lung_shape_n=rng.uniform(2.2, 3.0), inspiration=inspiration, parenchyma_hu=parenchyma,
        stomach=stomach, rib_period=rng.uniform(24, 30), rib_slope=rng.uniform(0.25, 0.45),
        rib_phase=rng.uniform(0, 30),
    )


class Grid:
    """Voxel-centre coordinates of the canonical grid in subject mm (x left, y posterior, z superior)."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray):
        d, h, w = shape
        self.shape = shape
        self.spacing = spacing
        self.z = (np.arange(d, dtype=np.float32) + 0.5) * np.float32(spacing[0])
        self.y = (np.arange(h, dtype=np.float32) - (h - 1) / 2.0) * np.float32(spacing[1])
        self.x = (np.arange(w, dtype=np.float32) - (w - 1) / 2.0) * np.float32(spacing[2])

    @classmethod
    def covering(cls, extent_mm: Sequence[float], shape: tuple[int, int, int]) -> Grid:
        """``shape`` voxels spread over ``extent_mm`` (a scanner's coverage): finer spacing for a larger shape."""
        return cls(shape, np.array([e / n for e, n in zip(extent_mm, shape, strict=True)], dtype=np.float64))

    def index(self, point: np.ndarray) -> np.ndarray:
        """Fractional voxel index ``(d, h, w)`` of a point ``(x, y, z)`` in mm."""
        x, y, z = point
        d, h, w = self.shape
        return np.array([z / self.spacing[0] - 0.5, y / self.spacing[1] + (h - 1) / 2.0,
                         x / self.spacing[2] + (w - 1) / 2.0])


def smooth_noise(rng: np.random.Generator, grid: Grid, sigma_mm: float, box: tuple[slice, ...] | None = None,
                  ) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma_mm``, on ``grid[box]``.

    Generated on a coarse grid (about sigma/2 spacing) and upsampled trilinearly, so its cost does not grow
    with the output resolution.
    """
    box = box or tuple(slice(0, n) for n in grid.shape)
    counts = [s.stop - s.start for s in box]
    # Never finer than the voxel grid: a small sigma is filtered on the voxels themselves.
    steps = [max(sigma_mm / 2.0, float(sp)) for sp in grid.spacing]
    coarse_n = [max(2, int(math.ceil(n * sp / st)) + 1) for n, sp, st in zip(counts, grid.spacing, steps, strict=True)]
    white = rng.standard_normal(coarse_n, dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma=[sigma_mm / st for st in steps], mode="wrap", truncate=3.0)
    field /= max(float(field.std()), 1e-6)
    coords = [np.arange(n, dtype=np.float64) * sp / st for n, sp, st in zip(counts, grid.spacing, steps, strict=True)]
    return sample_linear(field, coords)


def _lung_field(subj: Subject, side: int, X: np.ndarray, Y: np.ndarray, Z: np.ndarray,
                wobble: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Implicit lung function: returns (inside mask, radial coordinate rho in [0, 1] inside)."""
    cx, cy, rx, ry = subj.lung_geometry(side)
    t = (Z - subj.z_base) / subj.lung_h  # 0 at the base, 1 at the apex
    taper = np.sqrt(np.clip(1.0 - np.clip((t - 0.45) / 0.58, 0.0, None) ** 2, 0.0, 1.0))
    taper = taper * (0.93 + 0.07 * np.clip(t / 0.25, 0.0, 1.0))
    # The lung narrows toward the apex mostly from its lateral and anterior sides.
    ax = rx * np.maximum(taper, 1e-3)
    ay = ry * np.maximum(taper, 1e-3)
    ccx = cx - side * rx * (1.0 - taper) * 0.6
    ccy = cy + ry * (1.0 - taper) * 0.35
    n = subj.lung_shape_n
    u = np.abs((X - ccx) / ax)
    v = np.abs((Y - ccy) / ay)
    f = u ** n + v ** n
    rho = f ** (1.0 / n) * (1.0 + 0.06 * wobble)
    # Diaphragm dome: higher centrally, the recesses reach z_base; the right dome sits higher.
    r2 = np.clip(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2, 0.0, 1.0)
    dome = subj.z_base + (subj.dome_h + (subj.right_dome_extra if side < 0 else 0.0)) * (1.0 - r2)
    inside = (rho < 1.0) & (Z > dome) & (t < 1.0)
    return inside, rho


def render_anatomy(subj: Subject, grid: Grid, rng: np.random.Generator,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Body, bones, mediastinum and lung masks, slab by slab to bound memory at 512x512x300.

    Returns:
        hu (background anatomy, lungs filled with parenchyma HU), lung (uint8 1 right / 2 left),
        rho (radial lung coordinate, float16), zone t (relative lung height, float16).
    """
    d, h, w = grid.shape
    hu = np.empty(grid.shape, np.float32)
    lung = np.zeros(grid.shape, np.uint8)
    rho_all = np.ones(grid.shape, np.float16)
    wobble = smooth_noise(rng, grid, 30.0)
    texture = smooth_noise(rng, grid, 4.0)
    Y = grid.y[None, :, None]
    X = grid.x[None, None, :]
    s = subj
    slab = max(1, int(4_000_000 // (h * w)))
    hx, hy, hz, hax, hay, haz = s.heart
    cav_y = s.body_ay - s.fat - s.wall
    spine_cy = s.body_cy + s.body_ay - s.fat - 38.0
    for z0 in range(0, d, slab):
        z1 = min(d, z0 + slab)
        Z = grid.z[z0:z1, None, None]
        wob = wobble[z0:z1]
        # Body ellipse (slightly narrower in the abdomen and towards the neck), fat ring, muscle inside.
        zrel = (Z - s.z_base) / s.lung_h
        widen = 1.0 - 0.06 * np.clip(-zrel, 0, 1) - 0.10 * np.clip(zrel - 1.0, 0, 1)
        bx, by = s.body_ax * widen, s.body_ay * widen
        e = ((X / bx) ** 2 + ((Y - s.body_cy) / by) ** 2) * (1.0 + 0.015 * wob)
        e_in = (X / (bx - s.fat)) ** 2 + ((Y - s.body_cy) / (by - s.fat)) ** 2
        out = np.full(e.shape, AIR, np.float32)
        out = np.where(e < 1.0, np.float32(FAT), out)
        out = np.where(e_in < 1.0, np.float32(SOFT), out)
        # Patient table below the back (posterior), separated by a gap.
        ty = s.body_cy + s.body_ay + 12.0
        table = (Y > ty + 0.0006 * X ** 2) & (Y < ty + 8.0 + 0.0006 * X ** 2) & (np.abs(X) < 0.95 * s.body_ax + 20)
        out = np.where(table, np.float32(TABLE), out)
        # Mediastinal fat between the lungs in the chest.
        in_chest = (zrel > -0.05) & (zrel < 1.05)
        med = in_chest & (np.abs(X) < s.medial + 15) & (np.abs(Y - s.body_cy) < cav_y)
        out = np.where(med, np.float32(-80.0), out)
        # Heart and the descending aorta.
        heart = ((X - hx) / hax) ** 2 + ((Y - hy) / hay) ** 2 + ((Z - hz) / haz) ** 2 < 1.0
        aorta = ((X - 22.0) ** 2 + (Y - (spine_cy - 28.0)) ** 2 < 13.0 ** 2) & (zrel < 0.85) & (zrel > -0.3)
        out = np.where(heart | aorta, np.float32(BLOOD), out)
        # Liver below the right dome, a stomach bubble under the left one.
        liver = (X < 40) & (zrel < 0.05) & (e_in < 0.9)
        out = np.where(liver & (out > -500), np.float32(58.0), out)
        if s.stomach is not None:
            gx, gy, gz, gr = s.stomach
            bubble = (X - gx) ** 2 + (Y - gy) ** 2 + ((Z - gz) * 1.3) ** 2 < gr ** 2
            out = np.where(bubble, np.float32(AIR + 30.0), out)
        # Spine: vertebral body with cortical rim, canal behind it.
        rv = np.sqrt(X ** 2 + (Y - spine_cy) ** 2)
        out = np.where(rv < 20.0, np.float32(MARROW), out)
        out = np.where((rv >= 17.5) & (rv < 20.0), np.float32(BONE), out)
        canal = np.sqrt(X ** 2 + (Y - spine_cy - 28.0) ** 2)
        out = np.where((canal < 16.0) & (canal >= 10.0) & (e_in < 1.0), np.float32(BONE * 0.8), out)
        # Ribs: oblique bony bars in the chest wall (bright cortex, darker marrow), descending from the spine
        # to the front, so an axial slice cuts each one into a short arc; none at the spine or the sternum.
        theta = np.arctan2(X, -(Y - s.body_cy))  # 0 anterior, +-pi posterior
        q = np.sqrt((X / (bx - s.fat - 0.45 * s.wall)) ** 2 + ((Y - s.body_cy) / (by - s.fat - 0.45 * s.wall)) ** 2)
        d_rad = (q - 1.0) * (0.5 * (bx + by) - s.fat)
        phase = np.mod(Z + s.rib_slope * 80.0 * (np.pi - np.abs(theta)) + s.rib_phase, s.rib_period)
        rib_r = (d_rad / 5.5) ** 2 + ((phase - s.rib_period / 2) / 4.5) ** 2
        rib = (rib_r < 1.0) & (np.abs(theta) > 0.45) & (np.abs(theta) < np.pi - 0.3) & in_chest & (zrel < 1.08)
        out = np.where(rib, (300.0 + 500.0 * rib_r).astype(np.float32), out)
        sternum = in_chest & (np.abs(X) < 16) & (Y - s.body_cy < -(by - s.fat - 14)) & (Y - s.body_cy > -(by - s.fat))
        out = np.where(sternum, np.float32(MARROW + 100.0), out)
        # Lungs.
        par = (s.parenchyma_hu + 45.0 * (Y - s.body_cy + cav_y) / (2 * cav_y)  # gravity: posterior denser
               + 12.0 * texture[z0:z1])
        for side, code in ((-1, 1), (1, 2)):
            inside, rho = _lung_field(s, side, X, Y, Z, wob)
            # Inside the rib cage: at least ~7 mm of chest wall beyond the ribs' centre line.
            inside &= ~heart & ~aorta & (np.abs(X) > s.medial) & (rv > 26.0) & (d_rad < -7.0)
            out = np.where(inside, par, out)
            lung[z0:z1][inside] = code
            rho_all[z0:z1][inside] = rho[inside]
        hu[z0:z1] = out
    t_all = ((grid.z - s.z_base) / s.lung_h).astype(np.float16)
    return hu, lung, rho_all, t_all


def _draw_tube(frac: np.ndarray, grid: Grid, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> None:
    """Rasterise a tapered tube (p0 -> p1, radii r0 -> r1 mm) into ``frac`` as partial-volume fractions."""
    # Plain Python arithmetic for the bounding box: thousands of small tubes make NumPy call overhead matter.
    x0, y0, z0 = (float(v) for v in p0)
    x1, y1, z1 = (float(v) for v in p1)
    sd, sh, sw = (float(v) for v in grid.spacing)
    d, h, w = grid.shape
    pad = max(r0, r1) + 2.0 * max(sd, sh, sw)
    lo_d = max(int((min(z0, z1) - pad) / sd - 0.5), 0)
    hi_d = min(int((max(z0, z1) + pad) / sd - 0.5) + 2, d)
    lo_h = max(int((min(y0, y1) - pad) / sh + (h - 1) / 2.0), 0)
    hi_h = min(int((max(y0, y1) + pad) / sh + (h - 1) / 2.0) + 2, h)
    lo_w = max(int((min(x0, x1) - pad) / sw + (w - 1) / 2.0), 0)
    hi_w = min(int((max(x0, x1) + pad) / sw + (w - 1) / 2.0) + 2, w)
    if hi_d <= lo_d or hi_h <= lo_h or hi_w <= lo_w:
        return
    Z = grid.z[lo_d:hi_d, None, None] - np.float32(z0)
    Y = grid.y[None, lo_h:hi_h, None] - np.float32(y0)
    X = grid.x[None, None, lo_w:hi_w] - np.float32(x0)
    gx, gy, gz = x1 - x0, y1 - y0, z1 - z0
    inv = 1.0 / (gx * gx + gy * gy + gz * gz + 1e-6)
    tt = X * np.float32(gx * inv) + Y * np.float32(gy * inv) + Z * np.float32(gz * inv)
    np.clip(tt, 0.0, 1.0, out=tt)
    dist2 = (X - tt * np.float32(gx)) ** 2 + (Y - tt * np.float32(gy)) ** 2 + (Z - tt * np.float32(gz)) ** 2
    vox = min(sd, sh, sw)
    # fraction = clip((r(t) - dist) / vox + 0.5, 0, 1)
    f = tt * np.float32((r1 - r0) / vox) + np.float32(r0 / vox + 0.5)
    f -= np.sqrt(dist2) * np.float32(1.0 / vox)
    np.clip(f, 0.0, 1.0, out=f)
    view = frac[lo_d:hi_d, lo_h:hi_h, lo_w:hi_w]
    np.maximum(view, f, out=view)


def _grow_tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, radius: float, length: float,
               generations: int, inside: Callable[[np.ndarray], bool], min_radius: float = 0.0,
               ) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """A branching tree of segments (p0, p1, r0, r1) that stays inside the lung; bifurcates at each node."""
    segments = []
    stack = [(root, direction / np.linalg.norm(direction), radius, length, 0)]
    while stack:
        p, dvec, r, ln, g = stack.pop()
        end = p + dvec * ln
        if g > 0 and not inside(end):
            # Shorten once before giving up on the branch.
            end = p + dvec * ln * 0.5
            if not inside(end):
                continue
        segments.append((p, end, r, r * 0.85))
        if g + 1 >= generations or r * 0.77 < min_radius:
            continue
        for _ in range(2):
            for _attempt in range(4):
                jitter = rng.normal(0.0, 1.0, 3)
                jitter -= jitter @ dvec * dvec
                jitter /= np.linalg.norm(jitter) + 1e-9
                angle = rng.uniform(0.35, 0.75)
                child = dvec * math.cos(angle) + jitter * math.sin(angle)
                if inside(end + child * ln * 0.8):
                    break
            stack.append((end, child, r * rng.uniform(0.72, 0.82), ln * rng.uniform(0.72, 0.86), g + 1))
    return segments


def lung_vessels_and_airways(subj: Subject, grid: Grid, lung: np.ndarray, rng: np.random.Generator,
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vessel fraction, airway-wall fraction and airway-lumen fraction volumes (float32 in [0, 1])."""
    vessels = np.zeros(grid.shape, np.float32)
    wall = np.zeros(grid.shape, np.float32)
    lumen = np.zeros(grid.shape, np.float32)

    sd, sh, sw = (float(v) for v in grid.spacing)
    nd, nh, nw = grid.shape
    thin: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    thin_radius = 0.75 * float(grid.spacing.min())

    def inside(point: np.ndarray) -> bool:
        x, y, z = point.tolist()
        i, j, k = round(z / sd - 0.5), round(y / sh + (nh - 1) / 2.0), round(x / sw + (nw - 1) / 2.0)
        return 0 <= i < nd and 0 <= j < nh and 0 <= k < nw and bool(lung[i, j, k])

    carina_z = subj.z_base + 0.62 * subj.lung_h
    top_z = float(grid.z[-1]) + 5.0
    spine_cy = subj.body_cy + subj.body_ay - subj.fat - 38.0
    trachea_y = spine_cy - 45.0
    carina = np.array([0.0, trachea_y, carina_z])
    tr_r = rng.uniform(7.5, 10.0)
    _draw_tube(wall, grid, np.array([0.0, trachea_y, top_z]), carina, tr_r + 1.8, tr_r + 1.8)
    _draw_tube(lumen, grid, np.array([0.0, trachea_y, top_z]), carina, tr_r, tr_r)
    for side in (-1, 1):
        cx, cy, rx, ry = subj.lung_geometry(side)
        hilum = np.array([side * (subj.medial + 14.0), cy - 0.1 * ry, subj.z_base + 0.52 * subj.lung_h])
        _draw_tube(wall, grid, carina, hilum, 0.7 * tr_r + 1.5, 0.55 * tr_r + 1.3)
        _draw_tube(lumen, grid, carina, hilum, 0.7 * tr_r, 0.55 * tr_r)
        # Arteries fan out from the hilum to every lobe; veins drain to a point a little lower and behind.
        arteries = [(0.4, -0.3, 1.0), (0.5, 0.5, 0.9), (1.0, -0.4, 0.2), (0.9, 0.6, 0.0),
                    (0.6, -0.6, -0.8), (0.6, 0.7, -0.9), (1.0, 0.1, -0.6)]
        veins = [(0.7, -0.2, 0.8), (0.9, 0.5, 0.3), (0.8, -0.5, -0.6), (0.7, 0.6, -0.7)]
        roots = [(hilum, a, 1.0) for a in arteries] + [(hilum + np.array([0.0, 12.0, -22.0]), v, 0.9) for v in veins]
        for origin, direction, scale in roots:
            start = origin + np.array([side * 6.0, 0.0, 0.0])
            direction = np.array([side * direction[0], direction[1], direction[2]])
            segs = _grow_tree(rng, start, direction + rng.normal(0, 0.15, 3), scale * rng.uniform(4.2, 5.5),
                              rng.uniform(24, 32), 8, inside, min_radius=0.3 * float(grid.spacing.min()))
            thin.extend(seg for seg in segs if seg[2] < thin_radius)
            for p0, p1, r0, r1 in segs:
                if r0 < thin_radius:
                    continue
                _draw_tube(vessels, grid, p0, p1, r0, r1)
                if r0 > 2.2:  # bronchi run beside the arteries; only the larger ones are visible on CT
                    off = np.cross(p1 - p0, np.array([0.0, 0.0, 1.0]))
                    off = off / (np.linalg.norm(off) + 1e-9) * (r0 + 0.8 * r0 + 1.0)
                    ar = 0.7 * r0
                    _draw_tube(wall, grid, p0 + off, p1 + off, ar + 0.5 + 0.12 * ar, 0.85 * ar + 0.5)
                    _draw_tube(lumen, grid, p0 + off, p1 + off, ar, 0.85 * ar)
    _splat_thin_tubes(vessels, grid, thin)
    return vessels, wall, lumen


def draw_chest(rng: np.random.Generator, extent_mm: tuple[float, float, float], shape: tuple[int, int, int], label: str,
               severity: float) -> tuple[Subject, Grid, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One subject's chest before any disease, vessels or scanner: the first step of every phantom.

    Args:
        rng: the anatomy's random stream (also used for the vessels later, so keep drawing from it).
        extent_mm: the scanner's coverage ``(z, y, x)``; ``shape`` voxels are spread over it.
        label, severity: the class and its severity, for the lung-size changes that go with it
            (:func:`make_subject`).

    Returns:
        ``(subject, grid, hu, lung, rho, t)``, the last four as :func:`render_anatomy` returns them.
    """
    grid = Grid.covering(extent_mm, shape)
    subject = make_subject(rng, extent_mm, label, severity)
    return (subject, grid, *render_anatomy(subject, grid, rng))


def add_vessels_and_airways(subj: Subject, grid: Grid, lung: np.ndarray, rng: np.random.Generator,
                            *targets: np.ndarray) -> np.ndarray:
    """Grow the lungs' vessels and airways and draw them into each HU array of ``targets``, in place: vessels
    (inside the lungs only) as blood, airway walls as soft tissue, lumens as air, by partial volume.

    Returns:
        The lung mask as bool (``lung > 0``).
    """
    vessels, wall, lumen = lung_vessels_and_airways(subj, grid, lung, rng)
    in_lung = lung > 0
    vessels *= in_lung
    for hu in targets:
        hu += vessels * (BLOOD - hu)
        hu += wall * (SOFT - hu)
        hu += lumen * (AIR - hu)
    return in_lung


def _splat_thin_tubes(frac: np.ndarray, grid: Grid, segments: list[tuple[np.ndarray, np.ndarray, float, float]],
                      ) -> None:
    """Vessels thinner than a voxel, all at once: their partial volume (cross-section / voxel face) is put
    on the voxels along each centreline; the reconstruction blur later spreads it like a scanner would."""
    if not segments:
        return
    sp = grid.spacing
    step = 0.5 * float(sp.min())
    points, radii = [], []
    for p0, p1, r0, r1 in segments:
        n = max(2, int(np.linalg.norm(p1 - p0) / step) + 1)
        t = np.linspace(0.0, 1.0, n)[:, None]
        points.append(p0 + (p1 - p0) * t)
        radii.append(r0 + (r1 - r0) * t[:, 0])
    pts = np.concatenate(points)
    r = np.concatenate(radii)
    d, h, w = grid.shape
    idx = np.stack([np.rint(pts[:, 2] / sp[0] - 0.5), np.rint(pts[:, 1] / sp[1] + (h - 1) / 2.0),
                    np.rint(pts[:, 0] / sp[2] + (w - 1) / 2.0)], axis=1).astype(np.intp)
    ok = np.all((idx >= 0) & (idx < np.array(grid.shape)), axis=1)
    value = np.minimum(np.pi * r[ok] ** 2 / float(sp[1] * sp[2]), 1.0).astype(np.float32)
    np.maximum.at(frac, (idx[ok, 0], idx[ok, 1], idx[ok, 2]), value)


def lung_box(lung: np.ndarray) -> tuple[slice, slice, slice]:
    idx = [np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)  # type: ignore[return-value]
