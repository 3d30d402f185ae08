"""Class recipes: the physical ingredients of each Galaxy10 class, and :func:`render_galaxy`.

Neighbouring classes share parameter ranges on purpose (round vs in-between smooth, tight vs loose
spirals), so the task is learnable but not trivial.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pipeline.data.sources.synthetic.scene import Scene, single_thread_blas

MIN_SIZE = 16

_RED = np.array([1.28, 1.0, 0.70], np.float32)  # old stars: bulges, ellipticals
_YELLOW = np.array([1.12, 1.0, 0.86], np.float32)
_WHITE = np.array([1.0, 1.0, 1.0], np.float32)
_BLUE = np.array([0.78, 0.95, 1.30], np.float32)  # young stars: arms, knots, clumps


def _colour(rng: np.random.Generator, base: np.ndarray, jitter: float = 0.07) -> np.ndarray:
    """Base colour with a small random tint, so colour alone never pins the class."""
    return (base * (1.0 + rng.normal(0.0, jitter, 3))).astype(np.float32)


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return ((1.0 - t) * a + t * b).astype(np.float32)


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _smooth(sc: Scene, q_range: tuple[float, float], n_range: tuple[float, float], col_base: np.ndarray) -> None:
    """Featureless Sersic galaxy; the three smooth classes differ only in axis-ratio and index ranges."""
    rng, s = sc.rng, sc.s
    re = _loguniform(rng, 10.0, 30.0) * s
    n = rng.uniform(*n_range)
    q = rng.uniform(*q_range)
    ie = _loguniform(rng, 2.5, 12.0)
    sc.sersic(sc.cx, sc.cy, re, n, q, rng.uniform(0, math.pi), ie, _colour(rng, col_base))


def _spiral(sc: Scene, kind: str) -> None:
    """Bulge + exponential disk with log-spiral arms; ``kind`` in tight / loose / barred / one."""
    rng, s = sc.rng, sc.s
    pa = rng.uniform(0, math.pi)
    q = math.sqrt(rng.uniform(0.2, 1.0))  # cos(inclination): mostly face-on-ish, like GZ spirals
    h = _loguniform(rng, 12.0, 26.0) * s
    i0 = _loguniform(rng, 10.0, 45.0)
    alpha = rng.uniform(0, 2 * math.pi)
    hand = 1.0 if rng.random() < 0.5 else -1.0
    if kind == "tight":
        pitch, m = rng.uniform(9.0, 20.0), (2 if rng.random() < 0.75 else 3)
        re_b, ib = rng.uniform(0.25, 0.5) * h, rng.uniform(1.0, 3.0) * i0
        amp, sharp = rng.uniform(0.55, 0.85), int(rng.integers(1, 3))
        r0 = rng.uniform(1.2, 2.0) * re_b
        ramp = (0.6 * r0, 1.3 * r0)
    elif kind == "loose":
        pitch, m = rng.uniform(16.0, 38.0), (2 if rng.random() < 0.6 else 3)
        re_b, ib = rng.uniform(0.12, 0.32) * h, rng.uniform(0.4, 1.6) * i0
        amp, sharp = rng.uniform(0.6, 0.9), int(rng.integers(1, 3))
        r0 = rng.uniform(1.2, 2.5) * re_b
        ramp = (0.6 * r0, 1.3 * r0)
    elif kind == "barred":
        pitch, m = rng.uniform(10.0, 32.0), 2
        re_b, ib = rng.uniform(0.15, 0.4) * h, rng.uniform(0.6, 2.5) * i0
        amp, sharp = rng.uniform(0.55, 0.9), int(rng.integers(1, 3))
        r0 = rng.uniform(0.8, 1.6) * h
        ramp = (0.85 * r0, 1.1 * r0)
    else:  # one-armed, lopsided: part of the disturbed recipe
        pitch, m = rng.uniform(15.0, 40.0), 1
        re_b, ib = rng.uniform(0.1, 0.3) * h, rng.uniform(0.3, 1.2) * i0
        amp, sharp = rng.uniform(0.4, 0.8), 1
        r0 = rng.uniform(0.3, 1.0) * h
        ramp = (0.5 * r0, 1.2 * r0)
    norm = 4.0**sharp / math.comb(2 * sharp, sharp)  # keeps the azimuthal mean of the arm term at 1
    arms = {
        "m": m,
        "alpha": alpha,
        "r0": r0,
        "wind": hand / math.tan(math.radians(pitch)),
        "sharp": sharp,
        "ramp": ramp,
        "amp": amp,
        "norm": norm,
        "col": _colour(rng, _BLUE),
    }
    bar = None
    ring = None
    if kind == "barred":
        bar = {"alpha": alpha, "q": rng.uniform(0.15, 0.3), "len": r0, "i": rng.uniform(0.8, 2.0) * i0, "col": _colour(rng, _YELLOW)}
        if rng.random() < 0.3:
            ring = {"r": r0 * rng.uniform(0.95, 1.1), "w": rng.uniform(1.0, 2.0) * s, "i": rng.uniform(0.2, 0.5) * i0, "col": _colour(rng, _BLUE)}
    col_disk = _colour(rng, _mix(_YELLOW, _WHITE, rng.uniform(0, 1)))
    sc.disk(sc.cx, sc.cy, h, q, pa, i0, col_disk, arms=arms, bar=bar, ring=ring)
    sc.sersic(sc.cx, sc.cy, re_b, rng.uniform(1.5, 3.5), min(1.0, q + rng.uniform(0.1, 0.4)), pa, ib, _colour(rng, _RED))
    _knots(sc, arms, pa, q, h, i0, n=int(rng.poisson({"tight": 3, "loose": 9, "barred": 5}.get(kind, 4))))


def _knots(sc: Scene, arms: dict, pa: float, q: float, h: float, i0: float, n: int) -> None:
    """Star-forming knots strung along the arms (loose spirals are clumpier)."""
    rng = sc.rng
    r0, m, wind = arms["r0"], arms["m"], arms["wind"]
    cos, sin = math.cos(pa), math.sin(pa)
    rmax = max(3.0 * h, 1.5 * r0)
    for _ in range(n):
        r = r0 * math.exp(rng.uniform(0.05, 1.0) * math.log(rmax / r0))
        th = arms["alpha"] + math.log(r / r0) * wind + 2 * math.pi * int(rng.integers(0, m)) / m + rng.normal(0, 0.12)
        ud, vd = r * math.cos(th), r * math.sin(th) * q
        x, y = sc.cx + ud * cos - vd * sin, sc.cy + ud * sin + vd * cos
        w = rng.uniform(0.7, 2.0) * sc.s
        sb = i0 * math.exp(-r / h) * rng.uniform(1.0, 4.0)
        sc.blob(x, y, w, w, 0.0, sb * 2 * math.pi * w * w, _colour(rng, _BLUE, 0.1))


def _edge_on(sc: Scene, bulge: bool) -> None:
    """Thin exponential disk seen edge-on, often with a dust lane; ``bulge`` adds a rounder red centre."""
    rng, s = sc.rng, sc.s
    pa = rng.uniform(0, math.pi)
    h = _loguniform(rng, 14.0, 30.0) * s
    q = rng.uniform(0.06, 0.17)
    i0 = _loguniform(rng, 10.0, 45.0)
    sc.disk(sc.cx, sc.cy, h, q, pa, i0, _colour(rng, _mix(_YELLOW, _WHITE, rng.uniform(0, 0.7))))
    if bulge:
        re_b = rng.uniform(0.25, 0.6) * h
        sc.sersic(sc.cx, sc.cy, re_b, rng.uniform(1.5, 4.0), rng.uniform(0.55, 0.95), pa, rng.uniform(0.6, 2.0) * i0 * math.exp(-re_b / h), _colour(rng, _RED))
    elif rng.random() < 0.3:  # at most a tiny nucleus
        sc.sersic(sc.cx, sc.cy, rng.uniform(0.5, 1.2) * q * h, 1.0, 0.8, pa, 0.5 * i0, _colour(rng, _YELLOW))
    if rng.random() < 0.6:
        sc.dust_lane(sc.cx, sc.cy, pa, max(0.35 * q * h, 0.4 * s), rng.uniform(0.3, 0.75), 2.0 * h)


def _participant(sc: Scene, x: float, y: float, re: float) -> None:
    """One galaxy of a merging pair, smooth or disky, with effective size ``re`` px."""
    rng = sc.rng
    pa = rng.uniform(0, math.pi)
    if rng.random() < 0.55:
        sc.sersic(x, y, re, rng.uniform(1.5, 4.0), rng.uniform(0.5, 1.0), pa, _loguniform(rng, 2.0, 8.0), _colour(rng, _RED))
        return
    h = re / 1.7
    q = rng.uniform(0.35, 1.0)
    i0 = _loguniform(rng, 4.0, 18.0)
    sc.disk(x, y, h, q, pa, i0, _colour(rng, _mix(_YELLOW, _BLUE, rng.uniform(0, 0.6))))
    sc.sersic(x, y, rng.uniform(0.15, 0.4) * h, 2.0, min(1.0, q + 0.2), pa, rng.uniform(0.5, 2.0) * i0, _colour(rng, _RED))


def _merging(sc: Scene) -> None:
    """Two overlapping galaxies, tidal tails, sometimes a bridge and a common envelope."""
    rng, s = sc.rng, sc.s
    direction = rng.uniform(0, 2 * math.pi)
    ux, uy = math.cos(direction), math.sin(direction)
    re1 = _loguniform(rng, 10.0, 24.0) * s
    re2 = re1 * rng.uniform(0.45, 1.0)
    sep = min(rng.uniform(0.8, 2.2) * (re1 + re2) + 4 * s, 0.32 * sc.size)
    shift = rng.uniform(0.0, 0.45) * sep
    x1, y1 = sc.cx - ux * shift, sc.cy - uy * shift
    x2, y2 = x1 + ux * sep, y1 + uy * sep
    _participant(sc, x1, y1, re1)
    _participant(sc, x2, y2, re2)
    if rng.random() < 0.5:
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        sc.sersic(mx, my, rng.uniform(0.6, 1.0) * sep, 1.0, rng.uniform(0.35, 0.8), direction, rng.uniform(0.3, 0.9), _colour(rng, _YELLOW))
    for _ in range(int(rng.integers(1, 3))):
        first = rng.random() < 0.6
        gx, gy, gre = (x1, y1, re1) if first else (x2, y2, re2)
        away = direction + (math.pi if first else 0.0)
        sc.arc(
            gx,
            gy,
            gre,
            rng.uniform(2.5, 5.0) * gre,
            away + rng.normal(0, 0.8),
            float(rng.choice([-1.0, 1.0])) * rng.uniform(0.6, 1.8),
            int(rng.integers(10, 18)),
            (rng.uniform(1.5, 3.0) * s, rng.uniform(3.0, 6.0) * s),
            rng.uniform(1.0, 3.0),
            _colour(rng, _mix(_WHITE, _BLUE, 0.5)),
        )
    if rng.random() < 0.4:
        n = int(rng.integers(5, 10))
        for k in range(n):
            t = (k + 0.5) / n
            w = rng.uniform(1.5, 3.0) * s
            sc.blob(x1 + (x2 - x1) * t, y1 + (y2 - y1) * t, w * 1.5, w, direction, rng.uniform(0.5, 1.5) * 2 * math.pi * w * w, _colour(rng, _WHITE))


def _disturbed(sc: Scene) -> None:
    """One nucleus with asymmetric light: shells/plumes, a clumpy irregular, or a lopsided disk."""
    rng, s = sc.rng, sc.s
    off = rng.uniform(0, 2 * math.pi)
    co, so = math.cos(off), math.sin(off)
    kind = rng.random()
    if kind < 0.35:  # post-merger elliptical with shells and plumes
        re, ie = _loguniform(rng, 10.0, 24.0) * s, _loguniform(rng, 2.0, 8.0)
        sc.sersic(sc.cx, sc.cy, re, rng.uniform(2.0, 4.0), rng.uniform(0.6, 1.0), rng.uniform(0, math.pi), ie, _colour(rng, _RED))
        n_clumps, env = int(rng.integers(0, 4)), rng.uniform(0.1, 0.3)
        side = off
        for k in range(int(rng.integers(1, 4))):
            sc.shell(sc.cx, sc.cy, (1.6 + 0.9 * k + rng.uniform(0, 0.5)) * re, rng.uniform(1.5, 3.5) * s, side + rng.normal(0, 0.3), rng.uniform(0.3, 0.8) * ie, _colour(rng, _YELLOW))
            side += math.pi
    elif kind < 0.7:  # clumpy irregular
        re, ie = _loguniform(rng, 10.0, 24.0) * s, _loguniform(rng, 1.5, 5.0)
        sc.sersic(sc.cx, sc.cy, re, rng.uniform(0.6, 1.5), rng.uniform(0.4, 1.0), rng.uniform(0, math.pi), ie, _colour(rng, _mix(_YELLOW, _BLUE, rng.uniform(0.3, 1.0))))
        n_clumps, env = int(rng.integers(5, 15)), rng.uniform(0.3, 0.8)
    else:  # lopsided one-armed disk
        _spiral(sc, "one")
        re, ie = 14.0 * s, 3.0  # nominal scale for the asymmetric add-ons below
        n_clumps, env = int(rng.integers(2, 7)), rng.uniform(0.2, 0.5)
    d = rng.uniform(0.5, 1.3) * re
    sc.sersic(sc.cx + co * d, sc.cy + so * d, rng.uniform(1.2, 2.2) * re, 1.0, rng.uniform(0.35, 0.9), rng.uniform(0, math.pi), env * ie, _colour(rng, _mix(_YELLOW, _BLUE, 0.5)))
    for _ in range(n_clumps):
        ang = off + rng.normal(0, 1.0)
        r = rng.uniform(0.2, 1.8) * re
        w = rng.uniform(1.0, 3.5) * s
        sc.blob(sc.cx + r * math.cos(ang), sc.cy + r * math.sin(ang), w, w * rng.uniform(0.5, 1.0), rng.uniform(0, math.pi), ie * rng.uniform(1.5, 6.0) * 2 * math.pi * w * w, _colour(rng, _BLUE, 0.1))
    if rng.random() < 0.35:
        sc.arc(sc.cx, sc.cy, re, rng.uniform(2.0, 4.0) * re, off + rng.normal(0, 0.5), float(rng.choice([-1.0, 1.0])) * rng.uniform(0.3, 1.2), int(rng.integers(6, 12)), (2.0 * s, 5.0 * s), rng.uniform(0.4, 1.2) * ie, _colour(rng, _mix(_WHITE, _BLUE, 0.4)))


def _field(sc: Scene) -> None:
    """Foreground stars and faint background galaxies scattered over the cutout."""
    rng, s, size = sc.rng, sc.s, sc.size
    for _ in range(int(rng.poisson(1.5))):
        x, y = rng.uniform(0, size - 1, 2)
        sc.blob(float(x), float(y), 0.0, 0.0, 0.0, _loguniform(rng, 20.0, 4000.0) * s * s, _colour(rng, _mix(_BLUE, _RED, rng.uniform()), 0.05))
    for _ in range(int(rng.poisson(2.5))):
        x, y = rng.uniform(0, size - 1, 2)
        a = rng.uniform(0.8, 3.0) * s
        sc.blob(float(x), float(y), a, a * rng.uniform(0.3, 1.0), rng.uniform(0, math.pi), _loguniform(rng, 15.0, 300.0) * s * s, _colour(rng, _mix(_YELLOW, _RED, rng.uniform())))


# The recipe of each Galaxy10 class, by label (the order of ``pipeline.config.GALAXY10_CLASS_NAMES``).
RECIPES: tuple[Callable[[Scene], None], ...] = (
    _disturbed,
    _merging,
    lambda sc: _smooth(sc, (0.75, 1.0), (2.5, 5.0), _RED),  # round smooth
    lambda sc: _smooth(sc, (0.42, 0.82), (1.5, 4.5), _RED),  # in-between round smooth
    lambda sc: _smooth(sc, (0.16, 0.42), (1.0, 3.0), _mix(_RED, _YELLOW, 0.5)),  # cigar-shaped smooth
    lambda sc: _spiral(sc, "barred"),
    lambda sc: _spiral(sc, "tight"),
    lambda sc: _spiral(sc, "loose"),
    lambda sc: _edge_on(sc, bulge=False),
    lambda sc: _edge_on(sc, bulge=True),
)
NUM_CLASSES = len(RECIPES)


def render_galaxy(label: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One (size, size, 3) uint8 RGB cutout of Galaxy10 class ``label``, drawn from ``rng``."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    with single_thread_blas():
        return _render(int(label), rng, size)


def _render(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    sc = Scene(size, rng)
    RECIPES[label](sc)
    _field(sc)
    # Pixels of a smaller cutout average (256 / size)^2 DECals pixels: noise drops by size / 256.
    k = sc.s
    sky = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.8, 1.3) * k
    gain = rng.uniform(0.5, 3.0) / (k * k)
    stretch = (rng.uniform(0.8, 2.0), rng.uniform(2.0, 4.0), _loguniform(rng, 150.0, 600.0))
    return sc.render(sky, gain, stretch)
