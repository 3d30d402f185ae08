"""Deterministic Galaxy10-DECals-like images: the project's built-in offline data set.

Why: the real Galaxy10 DECals file is 2.7 GB and needs the network, but every stage
(ingest, validation, sharding, training, inference) must be runnable and testable offline.
Images are rendered from simple physical recipes (Sersic bulges, exponential disks, log
spiral arms, bars, tidal tails, clumps) so a CNN has real morphology to learn, with enough
parameter overlap between neighbouring classes that the task is not trivial.

Speed design (a 256 px image costs ~3 ms): smooth light is evaluated only inside the box
the galaxy occupies; the PSF blur is a separable Gaussian applied as two small matrix
products on that box; compact sources (stars, knots, clumps, tails) are Gaussians whose
PSF convolution is analytic; sky noise is a random crop of a fixed, precomputed noise
field, scaled by the local Poisson + sky variance.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.config import GALAXY10_CLASS_NAMES

CLASS_NAMES: tuple[str, ...] = GALAXY10_CLASS_NAMES
GALAXY10_COUNTS: tuple[int, ...] = (1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873)
PXSCALE: float = 0.262  # arcsec / px, DECals
NUM_CLASSES: int = len(GALAXY10_COUNTS)

_MIN_SIZE = 16
_REF_SIZE = 256.0  # all lengths below are in pixels of a 256 px cutout, scaled by size / 256
_THRESH = 0.2  # surface brightness (sky sigma at 256 px) where profiles are truncated
_BLUR_HALF = 64.0  # half-side (ref px) of a square region with the blur cost cap

_RED = np.array([1.28, 1.0, 0.70], np.float32)  # old stars: bulges, ellipticals
_YELLOW = np.array([1.12, 1.0, 0.86], np.float32)
_WHITE = np.array([1.0, 1.0, 1.0], np.float32)
_BLUE = np.array([0.78, 0.95, 1.30], np.float32)  # young stars: arms, knots, clumps

Painter = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def _colour(rng: np.random.Generator, base: np.ndarray, jitter: float = 0.07) -> np.ndarray:
    """Base colour with a small random tint, so colour alone never pins the class."""
    return (base * (1.0 + rng.normal(0.0, jitter, 3))).astype(np.float32)


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return ((1.0 - t) * a + t * b).astype(np.float32)


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _sersic_b(n: float) -> float:
    """Ciotti & Bertin approximation: half the light inside r_e."""
    return 2.0 * n - 1.0 / 3.0 + 0.009876 / n


def _sersic_extent(re: float, n: float, ie: float, thresh: float) -> float:
    """Radius where the profile falls to the truncation threshold."""
    if ie <= thresh:
        return re
    return re * (1.0 + math.log(ie / thresh) / _sersic_b(n)) ** n


class _Scene:
    """Parameters of one image: smooth painters (blurred on a box) plus Gaussian blobs."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.s = size / _REF_SIZE
        self.rng = rng
        self.painters: list[tuple[float, float, float, Painter]] = []  # (cx, cy, extent, paint)
        self.blobs: list[tuple[float, float, float, float, float, float, np.ndarray]] = []
        self.psf = rng.uniform(1.4, 2.4) * self.s  # sigma, px: FWHM ~0.9-1.5 arcsec
        self.thresh = _THRESH * self.s  # sky noise scales with size (see render_galaxy)
        c = (size - 1) / 2.0
        jit = np.clip(rng.normal(0.0, 1.5 * self.s, 2), -4 * self.s, 4 * self.s)
        self.cx, self.cy = c + float(jit[0]), c + float(jit[1])

    # ---- smooth components -------------------------------------------------------------
    def add_painter(self, cx: float, cy: float, extent: float, paint: Painter) -> None:
        self.painters.append((cx, cy, min(extent, 1.5 * self.size), paint))

    def sersic(self, cx: float, cy: float, re: float, n: float, q: float, pa: float, ie: float, col: np.ndarray) -> None:
        """Elliptical Sersic profile with effective radius ``re`` (px) and intensity ``ie`` at re."""
        b, inv_n = _sersic_b(n), 1.0 / n
        cos, sin = math.cos(pa), math.sin(pa)
        col3 = col[:, None, None] * np.float32(ie)
        floor = max(0.05 * re, 0.25) ** 2

        def paint(acc: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
            lr = np.log(_quadratic(x - cx, y - cy, pa, 1.0 / re**2, 1.0 / (q * re) ** 2, floor / re**2))
            lr *= 0.5 * inv_n
            prof = np.exp(lr)
            prof *= -b
            prof += b
            acc += col3 * np.exp(prof, out=prof)

        self.add_painter(cx, cy, _sersic_extent(re, n, ie, self.thresh), paint)

    def disk(
        self,
        cx: float,
        cy: float,
        h: float,
        q: float,
        pa: float,
        i0: float,
        col_disk: np.ndarray,
        *,
        arms: dict | None = None,
        bar: dict | None = None,
        ring: dict | None = None,
    ) -> None:
        """Inclined exponential disk (scale length ``h``) with optional log-spiral arms, bar and ring.

        Arms, bar and ring live in the disk plane, so they foreshorten with the inclination.
        Angles come from direction cosines (no arctan2: it is the slowest ufunc here).
        """
        cos, sin = math.cos(pa), math.sin(pa)
        extent = h * math.log(max(i0 / self.thresh, 1.5))
        col_d = col_disk[:, None, None] * np.float32(i0)

        def paint(acc: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
            dx, dy = x - cx, y - cy
            if arms is None and bar is None and ring is None:
                t = _quadratic(dx, dy, pa, 1.0 / h**2, 1.0 / (q * h) ** 2, 0.25 / h**2)
                np.sqrt(t, out=t)
                t *= -1.0
                acc += col_d * np.exp(t, out=t)
                return
            ud = dx * cos + dy * sin
            vd = (dy * cos - dx * sin) * (1.0 / q)
            r = np.sqrt(ud * ud + vd * vd + 0.25)
            base = np.exp(r * (-1.0 / h))
            if arms is None:
                acc += col_d * base
            else:
                m, alpha, r0 = arms["m"], arms["alpha"], arms["r0"]
                inv_r = 1.0 / r
                c1 = (ud * math.cos(alpha) + vd * math.sin(alpha)) * inv_r
                s1 = (vd * math.cos(alpha) - ud * math.sin(alpha)) * inv_r
                if m == 1:
                    cm, sm = c1, s1
                elif m == 2:
                    cm, sm = 2.0 * c1 * c1 - 1.0, 2.0 * s1 * c1
                else:
                    cm, sm = c1 * (4.0 * c1 * c1 - 3.0), s1 * (3.0 - 4.0 * s1 * s1)
                psi = np.log(r * (1.0 / r0)) * (m * arms["wind"])
                mod = (cm * np.cos(psi) + sm * np.sin(psi) + 1.0) * 0.5  # cos(m(theta - alpha) - psi)
                for _ in range(arms["sharp"]):
                    mod = mod * mod
                lo, hi = arms["ramp"]
                ramp = np.clip((r - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
                amp = arms["amp"]
                acc += col_d * (base * (1.0 - amp * ramp))
                acc += (arms["col"][:, None, None] * np.float32(i0 * amp * arms["norm"])) * (base * ramp * mod)
            if bar is not None:
                ca, sa = math.cos(bar["alpha"]), math.sin(bar["alpha"])
                ub = ud * ca + vd * sa
                vb = (vd * ca - ud * sa) * (1.0 / bar["q"])
                t = np.maximum(1.0 - (ub * ub + vb * vb) * (1.0 / bar["len"] ** 2), 0.0)
                acc += (bar["col"][:, None, None] * np.float32(bar["i"])) * (t * t)
            if ring is not None:
                z = (r - ring["r"]) * (1.0 / ring["w"])
                acc += (ring["col"][:, None, None] * np.float32(ring["i"])) * np.exp(z * z * -0.5)

        self.add_painter(cx, cy, extent, paint)

    def dust_lane(self, cx: float, cy: float, pa: float, width: float, depth: float, extent: float) -> None:
        """Multiplicative dust lane along the major axis; blue light is absorbed more."""
        tau = np.array([0.75, 0.9, 1.1], np.float32)[:, None, None] * np.float32(-depth)

        def paint(acc: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
            lane = _quadratic(x - cx, y - cy, pa, -1.0 / extent**2, -0.5 / width**2, 0.0)
            np.exp(lane, out=lane)
            acc *= tau * lane + 1.0

        self.add_painter(cx, cy, 0.0, paint)

    def shell(self, cx: float, cy: float, radius: float, width: float, toward: float, i: float, col: np.ndarray) -> None:
        """One-sided arc of light around a galaxy, the signature of a past minor merger."""
        ct, st = math.cos(toward), math.sin(toward)
        col3 = col[:, None, None] * np.float32(i)

        def paint(acc: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
            dx, dy = x - cx, y - cy
            r = np.sqrt(dx * dx + dy * dy + 0.25)
            cosang = (dx * ct + dy * st) / r
            w = np.maximum(cosang, 0.0)
            z = (r - radius) * (1.0 / width)
            acc += col3 * (np.exp(z * z * -0.5) * (w * w * w))

        self.add_painter(cx, cy, radius + 3 * width, paint)

    # ---- compact sources -----------------------------------------------------------------
    def blob(self, x: float, y: float, a: float, b: float, pa: float, flux: float, col: np.ndarray) -> None:
        """Elliptical Gaussian (axes a, b px) of total ``flux``; convolved with the PSF analytically."""
        self.blobs.append((x, y, a, b, pa, flux, col))

    def arc(
        self,
        cx: float,
        cy: float,
        r1: float,
        r2: float,
        theta0: float,
        curl: float,
        n: int,
        width: tuple[float, float],
        sb: float,
        col: np.ndarray,
    ) -> None:
        """A tidal tail / plume: a curved chain of widening, fading Gaussian blobs."""
        rng = self.rng
        for k in range(n):
            t = (k + rng.uniform(-0.3, 0.3)) / max(n - 1, 1)
            r = r1 + (r2 - r1) * t
            th = theta0 + curl * t
            w = width[0] + (width[1] - width[0]) * t
            fade = math.exp(-1.5 * t)
            self.blob(cx + r * math.cos(th), cy + r * math.sin(th), w * 1.6, w, th + math.pi / 2, sb * fade * 2 * math.pi * w * w, col)

    # ---- rendering -----------------------------------------------------------------------
    def render(self, sky: np.ndarray, gain: float, stretch: tuple[float, float, float]) -> np.ndarray:
        size, psf = self.size, self.psf
        flux = np.zeros((3, size, size), np.float32)
        coords = _coords(size)
        if self.painters:
            x0 = y0 = size
            x1 = y1 = 0
            for cx, cy, ext, _ in self.painters:
                ext = ext + 3 * psf + 1
                x0, x1 = min(x0, int(cx - ext)), max(x1, int(cx + ext) + 2)
                y0, y1 = min(y0, int(cy - ext)), max(y1, int(cy + ext) + 2)
            x0, y0 = max(x0, 0), max(y0, 0)
            x1, y1 = min(x1, size), min(y1, size)
            if x1 > x0 and y1 > y0:
                box = flux[:, y0:y1, x0:x1]
                xs, ys = coords[None, x0:x1], coords[y0:y1, None]
                for _, _, _, paint in self.painters:
                    paint(box, xs, ys)
                self._blur(flux, x0, x1, y0, y1)
        for blob in self.blobs:
            _add_blob(flux, coords, blob, psf, self.thresh)
        return _finish(flux, self.rng, sky, gain, stretch)

    def _blur(self, flux: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> None:
        """Separable Gaussian PSF as two matrix products on the central part of the galaxy box.

        The region is capped (GEMM cost grows as side^3); beyond it profiles are faint and
        smooth. Kernel rows are renormalised so the blurred region joins the rest without a step.
        """
        h, w = y1 - y0, x1 - x0
        cap = (2 * _BLUR_HALF * self.s + 1) ** 3 * 2
        if h * w * (h + w) > cap:
            f = (cap / (h * w * (h + w))) ** (1.0 / 3.0)
            ch, cw = max(int(h * f), 3), max(int(w * f), 3)
            y0, x0 = y0 + (h - ch) // 2, x0 + (w - cw) // 2
            h, w = ch, cw
        if h < 3 or w < 3:
            return
        region = np.ascontiguousarray(flux[:, y0 : y0 + h, x0 : x0 + w])  # BLAS needs contiguous operands
        rows = (region.reshape(3 * h, w) @ _blur_matrix(w, self.psf).T).reshape(3, h, w)
        flux[:, y0 : y0 + h, x0 : x0 + w] = np.matmul(_blur_matrix(h, self.psf), rows)


def _quadratic(dx: np.ndarray, dy: np.ndarray, pa: float, a: float, b: float, c: float) -> np.ndarray:
    """``a u^2 + b v^2 + c`` on the (len(dy), len(dx)) grid, u/v along/across position angle ``pa``.

    Expanded in dx, dy so only three full-grid operations are needed (the rest is 1-D).
    """
    cos, sin = math.cos(pa), math.sin(pa)
    out = (dy * (2.0 * cos * sin * (a - b))) * dx
    out += (a * cos * cos + b * sin * sin) * dx * dx
    out += (a * sin * sin + b * cos * cos) * dy * dy + c
    return out


@lru_cache(maxsize=1)
def _blas_controller() -> object | None:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _single_thread_blas() -> contextlib.AbstractContextManager:
    """Keep the small blur GEMMs on one thread.

    Why: multi-threaded OpenBLAS on ~150 px matrices is a loss, and on a busy machine its
    spinning threads made one blur 100x slower (2 ms -> 200 ms). threadpoolctl ships with
    scikit-learn; without it generation still works, only less robustly fast.
    """
    ctl = _blas_controller()
    return contextlib.nullcontext() if ctl is None else ctl.limit(limits=1, user_api="blas")


@lru_cache(maxsize=8)
def _coords(size: int) -> np.ndarray:
    """Pixel-centre coordinates, shared by every image of this size."""
    c = np.arange(size, dtype=np.float32)
    c.setflags(write=False)
    return c


@lru_cache(maxsize=64)
def _absdiff(n: int) -> np.ndarray:
    i = np.arange(n)
    d = np.abs(i[:, None] - i[None, :])
    d.setflags(write=False)
    return d


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian Toeplitz matrix: ``K @ x`` blurs along x's first axis."""
    k = np.exp(np.arange(n, dtype=np.float32) ** 2 * np.float32(-0.5 / (sigma * sigma)))
    c = np.cumsum(k)
    i = np.arange(n)
    rowsum = c[i] + c[n - 1 - i] - k[0]
    return np.take(k, _absdiff(n)) / rowsum[:, None]


def _add_blob(flux: np.ndarray, coords: np.ndarray, blob: tuple, psf: float, thresh: float) -> None:
    """Add one PSF-convolved elliptical Gaussian inside its own small window."""
    x, y, a, b, pa, total, col = blob
    a2, b2 = a * a + psf * psf, b * b + psf * psf
    amp = total / (2.0 * math.pi * math.sqrt(a2 * b2))
    if amp <= thresh * 0.5:
        return
    half = math.sqrt(max(a2, b2) * 2.0 * math.log(amp / (thresh * 0.5)))  # where it fades below threshold
    size = flux.shape[1]
    x0, x1 = max(int(x - half), 0), min(int(x + half) + 2, size)
    y0, y1 = max(int(y - half), 0), min(int(y + half) + 2, size)
    if x1 <= x0 or y1 <= y0:
        return
    dx, dy = coords[None, x0:x1] - x, coords[y0:y1, None] - y
    if abs(a2 - b2) < 1e-6:
        g = np.exp(dx * dx * (-0.5 / a2)) * np.exp(dy * dy * (-0.5 / a2))
    else:
        cos, sin = math.cos(pa), math.sin(pa)
        u = dx * cos + dy * sin
        v = dy * cos - dx * sin
        g = np.exp(u * u * (-0.5 / a2) + v * v * (-0.5 / b2))
    flux[:, y0:y1, x0:x1] += (col[:, None, None] * np.float32(amp)) * g


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed field of unit Gaussian noise, twice the image side, mildly correlated.

    Why: drawing 3 x 256 x 256 normals costs ~2 ms, most of the budget. Random crops,
    flips and channel shuffles of one fixed field are statistically just as good for a sky
    background, and the field is a constant of the module, so rows stay reproducible.
    The slight correlation mimics resampled DECals coadds.
    """
    n = 2 * size
    bank = np.random.default_rng(20240601).standard_normal((3, n, n))
    f = np.fft.fftfreq(n)
    transfer = np.exp(-2.0 * (math.pi * 0.6) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    bank = np.fft.ifft2(np.fft.fft2(bank) * transfer).real
    bank /= bank.std(axis=(1, 2), keepdims=True)
    out = bank.astype(np.float32)
    out.setflags(write=False)
    return out


def _finish(flux: np.ndarray, rng: np.random.Generator, sky: np.ndarray, gain: float, stretch: tuple[float, float, float]) -> np.ndarray:
    """Add sky + Poisson noise, then an asinh (Lupton) stretch to 8-bit RGB like DECals previews."""
    size = flux.shape[1]
    oy, ox = (int(v) for v in rng.integers(0, size + 1, 2))
    flip = int(rng.integers(0, 4))
    perm = rng.permutation(3)
    bank = _noise_bank(size)
    rows = slice(oy + size - 1, oy - 1 if oy else None, -1) if flip & 1 else slice(oy, oy + size)
    cols = slice(ox + size - 1, ox - 1 if ox else None, -1) if flip & 2 else slice(ox, ox + size)
    inv_gain = np.float32(1.0 / gain)
    for c in range(3):  # flux >= 0 here (positive kernels, dust transmits), so no clipping needed
        sigma = flux[c] * inv_gain
        sigma += np.float32(sky[c] ** 2)
        np.sqrt(sigma, out=sigma)
        sigma *= bank[perm[c], rows, cols]
        flux[c] += sigma
    pedestal, beta, top = stretch
    flux += np.float32(pedestal)
    lum = flux[0] + flux[1]
    lum += flux[2]
    np.maximum(lum, np.float32(1e-3), out=lum)
    z = lum * np.float32(1.0 / (3.0 * beta))
    scale = np.log(z + np.sqrt(z * z + 1.0))
    scale /= lum
    scale *= np.float32(3.0 * 255.0 / math.asinh(top / beta))
    flux *= scale
    np.clip(flux, 0.0, 255.0, out=flux)
    out = np.empty((size, size, 3), np.uint8)
    for c in range(3):  # channel by channel: ~5x faster than a transposing copy
        out[..., c] = flux[c]
    return out


# ---- class recipes ----------------------------------------------------------------------


def _smooth(sc: _Scene, q_range: tuple[float, float], n_range: tuple[float, float], col_base: np.ndarray) -> None:
    """Featureless Sersic galaxy; the three smooth classes differ only in axis-ratio and index ranges."""
    rng, s = sc.rng, sc.s
    re = _loguniform(rng, 10.0, 30.0) * s
    n = rng.uniform(*n_range)
    q = rng.uniform(*q_range)
    ie = _loguniform(rng, 2.5, 12.0)
    sc.sersic(sc.cx, sc.cy, re, n, q, rng.uniform(0, math.pi), ie, _colour(rng, col_base))


def _spiral(sc: _Scene, kind: str) -> None:
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


def _knots(sc: _Scene, arms: dict, pa: float, q: float, h: float, i0: float, n: int) -> None:
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


def _edge_on(sc: _Scene, bulge: bool) -> None:
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


def _participant(sc: _Scene, x: float, y: float, re: float) -> None:
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


def _merging(sc: _Scene) -> None:
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


def _disturbed(sc: _Scene) -> None:
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


def _field(sc: _Scene) -> None:
    """Foreground stars and faint background galaxies scattered over the cutout."""
    rng, s, size = sc.rng, sc.s, sc.size
    for _ in range(int(rng.poisson(1.5))):
        x, y = rng.uniform(0, size - 1, 2)
        sc.blob(float(x), float(y), 0.0, 0.0, 0.0, _loguniform(rng, 20.0, 4000.0) * s * s, _colour(rng, _mix(_BLUE, _RED, rng.uniform()), 0.05))
    for _ in range(int(rng.poisson(2.5))):
        x, y = rng.uniform(0, size - 1, 2)
        a = rng.uniform(0.8, 3.0) * s
        sc.blob(float(x), float(y), a, a * rng.uniform(0.3, 1.0), rng.uniform(0, math.pi), _loguniform(rng, 15.0, 300.0) * s * s, _colour(rng, _mix(_YELLOW, _RED, rng.uniform())))


def render_galaxy(label: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One (size, size, 3) uint8 RGB cutout of Galaxy10 class ``label``, drawn from ``rng``."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
    if size < _MIN_SIZE:
        raise ValueError(f"size must be >= {_MIN_SIZE}, got {size}")
    with _single_thread_blas():
        return _render(int(label), rng, size)


def _render(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    sc = _Scene(size, rng)
    if label == 0:
        _disturbed(sc)
    elif label == 1:
        _merging(sc)
    elif label == 2:
        _smooth(sc, (0.75, 1.0), (2.5, 5.0), _RED)
    elif label == 3:
        _smooth(sc, (0.42, 0.82), (1.5, 4.5), _RED)
    elif label == 4:
        _smooth(sc, (0.16, 0.42), (1.0, 3.0), _mix(_RED, _YELLOW, 0.5))
    elif label == 5:
        _spiral(sc, "barred")
    elif label == 6:
        _spiral(sc, "tight")
    elif label == 7:
        _spiral(sc, "loose")
    else:
        _edge_on(sc, bulge=label == 9)
    _field(sc)
    # Pixels of a smaller cutout average (256 / size)^2 DECals pixels: noise drops by size / 256.
    k = sc.s
    sky = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.8, 1.3) * k
    gain = rng.uniform(0.5, 3.0) / (k * k)
    stretch = (rng.uniform(0.8, 2.0), rng.uniform(2.0, 4.0), _loguniform(rng, 150.0, 600.0))
    return sc.render(sky, gain, stretch)


# ---- data-set API -------------------------------------------------------------------------


def _label_cdf(class_weights: Sequence[float] | None) -> np.ndarray:
    w = np.asarray(GALAXY10_COUNTS if class_weights is None else class_weights, dtype=np.float64)
    if w.shape != (NUM_CLASSES,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"class_weights must be {NUM_CLASSES} finite non-negative numbers with a positive sum, got {class_weights!r}")
    cdf = np.cumsum(w / w.sum())
    cdf[-1] = 1.0
    return cdf


def _row_rng(seed: int, i: int) -> np.random.Generator:
    """Row i's generator depends only on (seed, i): chunked and one-shot generation agree."""
    return np.random.default_rng([seed, i])


def _row_label(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """The first draw of every row is its label, so labels can be drawn without rendering."""
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), NUM_CLASSES - 1)


def _check_args(n: int, seed: int, start: int, size: int = _MIN_SIZE) -> None:
    if n < 0 or start < 0 or seed < 0:
        raise ValueError(f"n, start and seed must be >= 0, got n={n}, start={start}, seed={seed}")
    if size < _MIN_SIZE:
        raise ValueError(f"size must be >= {_MIN_SIZE}, got {size}")


def draw_labels(n: int, *, seed: int = 0, start: int = 0, class_weights: Sequence[float] | None = None) -> np.ndarray:
    """Labels of rows start..start+n, identical to ``generate_arrays(...)["ans"]`` but without rendering."""
    _check_args(n, seed, start)
    cdf = _label_cdf(class_weights)
    return np.array([_row_label(_row_rng(seed, i), cdf) for i in range(start, start + n)], dtype=np.uint8)


def generate_arrays(
    n: int,
    *,
    size: int = 256,
    seed: int = 0,
    start: int = 0,
    class_weights: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Rows start..start+n of the deterministic synthetic sequence for ``seed``, in Galaxy10 layout."""
    _check_args(n, seed, start, size)
    cdf = _label_cdf(class_weights)
    images = np.empty((n, size, size, 3), np.uint8)
    out = {name: np.empty(n, np.float64) for name in ("ra", "dec", "redshift", "pxscale")}
    ans = np.empty(n, np.uint8)
    sin_lo, sin_hi = math.sin(math.radians(-25.0)), math.sin(math.radians(35.0))  # DECaLS-like footprint
    pxscale = PXSCALE * _REF_SIZE / size  # the cutout always spans 256 DECals pixels of sky
    for k in range(n):
        rng = _row_rng(seed, start + k)
        label = _row_label(rng, cdf)
        ans[k] = label
        out["ra"][k] = rng.uniform(0.0, 360.0)
        out["dec"][k] = math.degrees(math.asin(rng.uniform(sin_lo, sin_hi)))
        out["redshift"][k] = 0.004 + rng.gamma(2.2, 0.03)
        out["pxscale"][k] = pxscale
        images[k] = render_galaxy(label, rng, size)
    return {"images": images, "ans": ans, **out}


def write_synthetic_h5(
    path: str | os.PathLike,
    n: int,
    *,
    size: int = 256,
    seed: int = 0,
    chunk: int = 256,
    class_weights: Sequence[float] | None = None,
    progress: bool = True,
) -> Path:
    """Write ``n`` synthetic images with the Galaxy10 DECals HDF5 schema, atomically.

    Generated and written ``chunk`` rows at a time so memory stays bounded; the file appears
    at ``path`` only once complete (written to ``path + ".tmp"`` then ``os.replace``).
    """
    import h5py
    from tqdm.auto import tqdm

    if n <= 0 or chunk <= 0:
        raise ValueError(f"n and chunk must be > 0, got n={n}, chunk={chunk}")
    _check_args(n, seed, 0, size)
    _label_cdf(class_weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    try:
        with h5py.File(tmp, "w") as f, tqdm(total=n, unit="img", desc=f"synthetic {path.name}", disable=not progress) as bar:
            images = f.create_dataset("images", (n, size, size, 3), np.uint8, chunks=(1, size, size, 3), compression="gzip", compression_opts=1)
            fields = {"ans": f.create_dataset("ans", (n,), np.uint8)}
            for name in ("ra", "dec", "redshift", "pxscale"):
                fields[name] = f.create_dataset(name, (n,), np.float64)
            f.attrs["generator"] = "astroflow pipeline.data.sources.synthetic"
            f.attrs["seed"] = seed
            for lo in range(0, n, chunk):
                m = min(chunk, n - lo)
                batch = generate_arrays(m, size=size, seed=seed, start=lo, class_weights=class_weights)
                images[lo : lo + m] = batch["images"]
                for name, dset in fields.items():
                    dset[lo : lo + m] = batch[name]
                bar.update(m)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def preview_grid(path_png: str | os.PathLike, n_per_class: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Save a class-by-example PNG grid, for eyeballing that each class looks like its morphology."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(NUM_CLASSES, n_per_class, figsize=(1.6 * n_per_class + 2.2, 1.6 * NUM_CLASSES), squeeze=False)
    for label in range(NUM_CLASSES):
        for j in range(n_per_class):
            ax = axes[label, j]
            ax.imshow(render_galaxy(label, np.random.default_rng([seed, label, j]), size))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[label, 0].set_ylabel(f"{label} {CLASS_NAMES[label]}", rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path_png)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
