"""The real Galaxy10 DECals file: download (resumable, verified) or a local copy, then read as ``h5``."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.io import sha256_file
from pipeline.layout import Layout
from pipeline.progress import tqdm

FILENAME = "Galaxy10_DECals.h5"
CONNECT_TIMEOUT_S = 15


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def verify_sha256(path: Path, expected: str) -> None:
    """Hash once; remember (size, mtime) of a verified file so a 2.5 GB file is not re-hashed every run."""
    marker = _verified_marker(path)
    st = path.stat()
    stamp = {"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return
        except (OSError, ValueError):
            pass
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"{path}: SHA256 is {actual}, expected {expected} (data.galaxy10.sha256); the file is corrupt or another version")
    marker.write_text(json.dumps(stamp))


def download(url: str, dest: Path, *, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming a partial download with an HTTP Range request."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already complete
            response = None
        else:
            raise DataError(f"{url}: download failed with HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download {url} ({reason}). Without internet, download it elsewhere and put it at {dest} "
            f"(or set data.path=/path/to/{FILENAME})"
        ) from None
    if response is not None:
        with response:
            resumed = have and response.status == 206
            if not resumed:
                have = 0
            total = response.headers.get("Content-Length")
            total_bytes = have + int(total) if total else None
            with open(part, "ab" if resumed else "wb") as fh, tqdm(
                total=total_bytes, initial=have, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=not progress
            ) as bar:
                while block := response.read(1 << 20):
                    fh.write(block)
                    bar.update(len(block))
        got = part.stat().st_size
        if total_bytes is not None and got < total_bytes:
            raise DataError(
                f"{url}: download interrupted at {got} of {total_bytes} bytes; run again to resume from {part}"
            )
    if sha256:
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise DataError(f"{url}: downloaded file has SHA256 {actual}, expected {sha256}; removed it, try again")
    os.replace(part, dest)
    return dest


def ensure_galaxy10(data: DataConfig, layout: Layout, *, progress: bool = True) -> Path:
    """Path of a verified Galaxy10 DECals file: ``data.path`` if given, else the cache, else download."""
    cfg = data.galaxy10
    if data.path:
        path = layout.resolve(data.path)
        if not path.is_file():
            raise DataError(f"{path}: data.path given for data.source=galaxy10 but no file is there")
    else:
        path = layout.resolve(cfg.cache_dir) / FILENAME
        if not path.is_file():
            download(cfg.url, path, sha256=cfg.sha256, progress=progress)
    verify_sha256(path, cfg.sha256)
    return path
