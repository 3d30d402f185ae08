"""The scene of one synthetic image: smooth light profiles and compact blobs, blurred, noised and stretched.

Speed design (a 256 px image costs ~3 ms): smooth light is evaluated only inside the box
the galaxy occupies; the PSF blur is a separable Gaussian applied as two small matrix
products on that box; compact sources (stars, knots, clumps, tails) are Gaussians whose
PSF convolution is analytic; sky noise is a random crop of a fixed, precomputed noise
field, scaled by the local Poisson + sky variance.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np

REF_SIZE = 256.0  # all lengths are in pixels of a 256 px cutout, scaled by size / 256
_THRESH = 0.2  # surface brightness (sky sigma at 256 px) where profiles are truncated
_BLUR_HALF = 64.0  # half-side (ref px) of a square region with the blur cost cap

Painter = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def _sersic_b(n: float) -> float:
    """Ciotti & Bertin approximation: half the light inside r_e."""
    return 2.0 * n - 1.0 / 3.0 + 0.009876 / n


def _sersic_extent(re: float, n: float, ie: float, thresh: float) -> float:
    """Radius where the profile falls to the truncation threshold."""
    if ie <= thresh:
        return re
    return re * (1.0 + math.log(ie / thresh) / _sersic_b(n)) ** n


class Scene:
    """Parameters of one image: smooth painters (blurred on a box) plus Gaussian blobs."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.s = size / REF_SIZE
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
                mod = _arm_pattern(ud, vd, r, arms)
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


def _arm_pattern(ud: np.ndarray, vd: np.ndarray, r: np.ndarray, arms: dict) -> np.ndarray:
    """Brightness of ``m`` log-spiral arms in [0, 1] at disk-plane coordinates (``ud``, ``vd``) at radius ``r``."""
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
    return mod


@lru_cache(maxsize=1)
def _blas_controller() -> object | None:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def single_thread_blas() -> contextlib.AbstractContextManager:
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
