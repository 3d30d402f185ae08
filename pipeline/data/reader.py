"""The one shard reader: training, its validation pass, calibrate, evaluate and predict read shards here.

Tar files are opened in this module only (WebDataset underneath), and every sample becomes the one
:class:`~pipeline.data.record.Record` (:func:`record_of`). Two ways in:

* **Streams** (:func:`make_loader`, :func:`iter_split`): the samples of one split, split by rank and DataLoader
  worker; shuffled, endless and in class-stratified batches for training, or one ordered pass for training's
  validation, calibrate and evaluate.
* **An index** (:func:`index_shard`, :func:`read_items`): samples located by tar member offset, so predict reads
  any chunk in any worker, and reports the samples of a truncated shard as error records.

Reader slots. The reading work is split into units: each shard, cut into ``ceil(slots / shards)``
interleaved parts when there are fewer shards than reader slots (ranks x workers), so every slot gets work and
every sample belongs to exactly one unit. In training, units are dealt to slots after a per-epoch shuffle; a slot
cycles through its units (re-dealt each cycle) until it has produced its share of batches, so ranks whose shards
hold fewer samples top up from the next cycle instead of stalling the others. An ordered pass deals the units in
shard order once: with no more workers than shards, worker ``w`` reads shards ``w, w + workers, ...``.

Class-stratified batches (``StreamSpec.stratify``). Each slot keeps its shuffled samples in per-class
FIFO queues. A batch takes the oldest queued sample of every class in ``stratify``, then fills
its remaining ``batch_size - len(stratify)`` places with the oldest queued samples whatever their class, so
class frequencies otherwise follow the data. Queues fill until every class has a sample or the buffer reaches
``max(shuffle_buffer, 4 * batch_size)`` samples; a class still missing then reuses one of its recently emitted
samples (a class rarer than one per batch is thus oversampled by replay rather than dropped).

Randomness. Every draw is seeded from ``(seed, epoch)`` and a stream tag, so an epoch's data order is a pure
function of the spec (and of the number of reader slots).

Consecutive epochs (``StreamSpec.epochs`` > 1, :class:`EpochStream`). Training reads all its epochs through one
loader, so workers start once per run and decode the next epoch while the trainer validates. Each epoch is
re-seeded inside the worker exactly as a loader for that epoch alone would be, so an epoch's batches do not depend
on where the stream started (a resumed run sees the same batches). Every worker yields ``ceil(steps / workers)``
batches per epoch, which keeps the DataLoader's round-robin aligned at epoch starts; the surplus batches (fewer
than ``workers``) are dropped.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
import re
import tarfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.record import Record, error_text, optional_float
from pipeline.data.shards import shard_urls
from pipeline.errors import DataError

log = logging.getLogger(__name__)

REPLAY_PER_CLASS = 16

Sample = tuple[dict[str, Any], int]  # a raw WebDataset sample (member bytes by extension) and its label

# Seed streams: one purpose per tag so no two consumers share a random sequence (MAIN_STREAM is the trainer's,
# DEVICE_AUG_STREAM the trainer's on-device augmentation).
MAIN_STREAM, _WORKER, _UNITS, _BUFFER, _LOADER, DEVICE_AUG_STREAM = range(6)


def seed_int(*parts: int) -> int:
    """A 32-bit seed that depends on every part (numpy's SeedSequence hashing, no collisions by addition)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(*parts: int) -> None:
    """Seed Python's, numpy's and torch's global generators: timm's augmentations and mixup draw from them."""
    s = seed_int(*parts)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ---------------------------------------------------------------- samples -> records


def decode_image(sample: dict[str, Any]) -> np.ndarray:
    """The HWC uint8 image of a raw sample, whatever format it was written in (a writable array)."""
    if "png" in sample:
        data, kind = sample["png"], "png"
    elif "jpg" in sample:
        data, kind = sample["jpg"], "jpg"
    elif "npy" in sample:
        return np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    else:
        raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image member")
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            raise DataError(f"{sample.get('__url__')}: sample {sample.get('__key__')} .{kind} is {im.mode}, expected RGB")
        # a copy: PIL's buffer is read-only, and torch warns on wrapping those
        return np.array(im)


def record_of(sample: dict[str, Any], *, decode: bool = True) -> Record:
    """The record of a raw sample: the fields of its JSON member, and (``decode``) its image.

    ``source_file`` is the shard and ``source_row`` the sample's position in it (``__source_row__``).
    """
    url = str(sample.get("__url__", ""))
    meta = json.loads(sample["json"]) if "json" in sample else {}
    record = Record(
        id=str(meta.get("id", f"{Path(url).name}:{sample.get('__key__')}")),
        source_file=url,
        source_row=sample.get("__source_row__"),
        row=meta.get("row"),
        label=meta.get("label"),
        ra=optional_float(meta.get("ra")),
        dec=optional_float(meta.get("dec")),
    )
    if decode:
        record.image = decode_image(sample)
    return record


# ---------------------------------------------------------------- streams


@dataclass(frozen=True)
class StreamSpec:
    """What one rank's loader reads from ``epoch`` on, for ``epochs`` epochs; ``steps=None`` means a single ordered pass."""

    urls: tuple[str, ...]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    epoch: int = 0
    steps: int | None = None
    shuffle_buffer: int = 0
    stratify: tuple[int, ...] = ()
    epochs: int = 1

    @property
    def train(self) -> bool:
        return self.steps is not None


class Batch(NamedTuple):
    """One batch as a loader delivers it: the transformed images stacked, labels, and the samples' ids and rows."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    rows: list[int]


def _units(num_shards: int, slots: int) -> list[tuple[int, int, int]]:
    """(shard, part, parts): enough units that every reader slot gets at least one."""
    parts = max(1, math.ceil(slots / num_shards))
    return [(s, p, parts) for s in range(num_shards) for p in range(parts)]


def _read_unit(url: str, part: int, parts: int) -> Iterator[Sample]:
    for i, sample in enumerate(wds.tariterators.tarfile_samples([{"url": url}])):
        if i % parts == part:
            sample["__source_row__"] = i
            yield sample, int(json.loads(sample["json"])["label"])


def slot_samples(spec: StreamSpec, slot: int, slots: int) -> Iterator[Sample]:
    """The raw samples of one reader slot: one ordered pass, or shuffled cycles without end (training)."""
    units = _units(len(spec.urls), slots)
    for cycle in itertools.count():
        order = list(units)
        if spec.train:
            random.Random(seed_int(spec.seed, spec.epoch, _UNITS, cycle)).shuffle(order)
        produced = 0
        for shard, part, parts in order[slot::slots]:
            for item in _read_unit(spec.urls[shard], part, parts):
                produced += 1
                yield item
        if not spec.train:
            return
        if produced == 0:
            raise DataError(f"reader slot {slot} of {slots} got no training samples from {len(spec.urls)} shard(s)")


def plain_batches(samples: Iterator[Sample], batch_size: int) -> Iterator[list[Sample]]:
    while batch := list(itertools.islice(samples, batch_size)):
        yield batch


def stratified_batches(
    samples: Iterator[Sample],
    batch_size: int,
    classes: Sequence[int],
    rng: random.Random,
    max_buffer: int,
) -> Iterator[list[Sample]]:
    """Batches that each hold every class in ``classes`` (see the module docstring for the exact rule)."""
    if batch_size < len(classes):
        raise ValueError(f"batch_size ({batch_size}) must be >= the {len(classes)} classes for stratified batches")
    queues: dict[int, deque[tuple[int, Sample]]] = {c: deque() for c in classes}
    replay: dict[int, deque[Sample]] = {c: deque(maxlen=REPLAY_PER_CLASS) for c in classes}
    arrival = itertools.count()
    buffered = 0
    exhausted = False
    warned: set[int] = set()
    while True:
        while not exhausted and buffered < max_buffer and (
            buffered < batch_size or any(not queues[c] for c in classes)
        ):
            item = next(samples, None)
            if item is None:
                exhausted = True
                break
            queues.setdefault(item[1], deque()).append((next(arrival), item))
            buffered += 1
        if buffered == 0:
            return
        batch: list[Sample] = []

        def take(c: int) -> None:
            nonlocal buffered
            item = queues[c].popleft()[1]
            buffered -= 1
            if c in replay:
                replay[c].append(item)
            batch.append(item)

        for c in classes:
            if queues[c]:
                take(c)
            elif replay[c]:
                batch.append(rng.choice(replay[c]))
            elif c not in warned:
                warned.add(c)
                log.warning("class %d not seen within %d buffered samples: some batches lack it", c, max_buffer)
        while len(batch) < batch_size and buffered > 0:
            take(min((q[0][0], c) for c, q in queues.items() if q)[1])
        if exhausted and len(batch) < batch_size:
            if batch:
                yield batch
            return
        rng.shuffle(batch)
        yield batch


def _collate(images: list[np.ndarray | torch.Tensor], records: list[Record]) -> Batch:
    labels = torch.tensor([r.label for r in records], dtype=torch.int64)
    if isinstance(images[0], torch.Tensor):
        x = torch.stack(images)
    else:  # NHWC uint8 viewed as NCHW: channels_last strides, no copy; normalised later on the device
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return Batch(x, labels, [r.id for r in records], [int(r.row) for r in records])


class ShardStream(IterableDataset):
    """One rank's batches for one epoch (or one pass); each DataLoader worker is one reader slot.

    Training-set cache (``cache_bytes`` > 0, per worker): a sample's record is decoded on its first read and kept,
    its image in the transform's ``cache_form`` when it has one (resized when that is exact), until the budget is
    spent; later reads take it from memory. The stream still walks the shards for the order and the labels, and the
    transform's draws are the same either way, so the batches are identical with or without the cache.
    """

    def __init__(self, spec: StreamSpec, transform: Callable[[np.ndarray], Any], cache_bytes: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.transform = transform
        self.cache_bytes = cache_bytes
        self.cache: dict[tuple[str, str], Record] = {}
        self.cached_bytes = 0

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.spec.train:
            yield from self._batches(self.spec, worker, workers)
            return
        for epoch in range(self.spec.epoch, self.spec.epoch + self.spec.epochs):
            yield from self._batches(replace(self.spec, epoch=epoch), worker, workers)

    def _batches(self, spec: StreamSpec, worker: int, workers: int) -> Iterator[Batch]:
        """One epoch (or the pass) of one worker's batches."""
        slot, slots = spec.rank * workers + worker, spec.world_size * workers
        samples = slot_samples(spec, slot, slots)
        if spec.train:
            seed_everything(spec.seed, spec.epoch, _WORKER, slot)
            rng = random.Random(seed_int(spec.seed, spec.epoch, _BUFFER, slot))
            if spec.shuffle_buffer > 1:
                samples = wds.filters.shuffle(spec.shuffle_buffer, spec.shuffle_buffer, rng=rng)(samples)
            if spec.stratify:
                max_buffer = max(spec.shuffle_buffer, 4 * spec.batch_size)
                batches = stratified_batches(samples, spec.batch_size, spec.stratify, rng, max_buffer)
            else:
                batches = plain_batches(samples, spec.batch_size)
            assert spec.steps is not None
            count = -(-spec.steps // workers) if spec.epochs > 1 else spec.steps // workers + (worker < spec.steps % workers)
            batches = itertools.islice(batches, count)
        else:
            batches = plain_batches(samples, spec.batch_size)
        for batch in batches:
            records = [self._record(sample) if spec.train else record_of(sample) for sample, _ in batch]
            yield _collate([self.transform(r.image) for r in records], records)

    def _record(self, sample: dict[str, Any]) -> Record:
        """A training sample's record, from the cache when an earlier epoch decoded it (see the class docstring)."""
        if not self.cache_bytes:
            return record_of(sample)
        key = (str(sample.get("__url__")), str(sample.get("__key__")))
        record = self.cache.get(key)
        if record is None:
            record = record_of(sample)
            form = getattr(self.transform, "cache_form", None)
            if form is not None:
                record.image = form(record.image)
            if self.cached_bytes + record.image.nbytes <= self.cache_bytes:
                self.cache[key] = record
                self.cached_bytes += record.image.nbytes
        return record


def make_loader(
    spec: StreamSpec, transform: Callable[[np.ndarray], Any], workers: int, pin_memory: bool, cache_bytes: int = 0
) -> DataLoader:
    """A loader of :class:`Batch` es for the spec's epochs or pass: workers are forked with its spec and seeded from it;
    ``cache_bytes`` is the training-set cache of the whole loader, shared out equally between its workers."""
    generator = torch.Generator().manual_seed(seed_int(spec.seed, spec.epoch, _LOADER))
    return DataLoader(
        ShardStream(spec, transform, cache_bytes // max(1, workers)),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=generator,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )


class EpochStream:
    """A run's training batches, epoch after epoch, from one loader (see "Consecutive epochs" above)."""

    def __init__(
        self, spec: StreamSpec, transform: Callable[[np.ndarray], Any], workers: int, pin_memory: bool, cache_bytes: int = 0
    ) -> None:
        if spec.steps is None:
            raise ValueError("EpochStream needs a training spec (steps set)")
        self.steps = spec.steps
        slots = max(1, workers)
        self.surplus = -(-spec.steps // slots) * slots - spec.steps if spec.epochs > 1 else 0
        self.loader = make_loader(spec, transform, workers, pin_memory, cache_bytes)
        self._batches: Iterator[Batch] | None = None

    def next_epoch(self) -> Iterator[Batch]:
        """The next epoch's ``steps`` batches (consume them all before asking for the next epoch)."""
        if self._batches is None:
            self._batches = iter(self.loader)
        else:
            for _ in itertools.islice(self._batches, self.surplus):
                pass
        return itertools.islice(self._batches, self.steps)

    def close(self) -> None:
        """Drop the loader's iterator: the DataLoader stops its workers when the iterator is collected."""
        self._batches = None


def iter_split(shards_dir: Path, split: str) -> Iterator[Record]:
    """Every record of a split in written order, in this process: for small tools and tests."""
    spec = StreamSpec(urls=tuple(shard_urls(shards_dir, split)), batch_size=1)
    for sample, _ in slot_samples(spec, 0, 1):
        yield record_of(sample)


# ---------------------------------------------------------------- the index (predict)


_KEY = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")
_INDEXED_IMAGES = ("png", "jpg", "jpeg", "npy")


@dataclass(frozen=True)
class ShardItem:
    """Where one sample's members lie in its shard: enough for any process to read it without the tar index."""

    tar: str
    key: str
    source_row: int
    ext: str
    offset: int
    size: int
    meta_offset: int | None
    meta_size: int


def index_shard(tar: Path, expected: int | None = None) -> Iterator[ShardItem | Record]:
    """The samples of one shard from its tar headers (member data is skipped by seeking, not read).

    A sample that cannot be read, or the unreadable tail of a truncated shard (fewer samples than the manifest's
    ``expected``, garbage after the last member), is an error record.
    """
    name = str(tar)
    if not tar.is_file():
        yield Record(f"{tar.name}#missing", name, None, error="shard file missing")
        return
    real = tar.stat().st_size
    walk: dict[str, Any] = {"end": 0}
    count = 0
    for count, (key, members) in enumerate(_member_groups(tar, walk), start=1):
        yield _item(tar, real, key, count - 1, members)
    tail = f"{tar.name}#tail"
    if "error" in walk:
        yield Record(tail, name, count, error=f"unreadable shard after {count} samples: {error_text(walk['error'])}")
    elif _tail_is_garbage(tar, walk["end"]):
        yield Record(tail, name, count, error=f"truncated shard: unreadable data after {count} samples")
    elif expected is not None and count < expected:
        yield Record(tail, name, count, error=f"truncated shard: {count} samples, the manifest lists {expected}")


def _member_groups(tar: Path, walk: dict[str, Any]) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {extension: (offset, size)}) per sample in tar order; ``walk`` gets the data's end, or the error."""
    key: str | None = None
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(tar, "r:") as tf:
            for member in tf:
                walk["end"] = member.offset_data + member.size
                m = _KEY.match(member.name) if member.isfile() else None
                if m is None:
                    continue
                if m.group(1) != key:
                    if key is not None:
                        yield key, members
                    key, members = m.group(1), {}
                members[m.group(2).lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        walk["error"] = exc
    if key is not None:
        yield key, members


def _item(tar: Path, real: int, key: str, source_row: int, members: dict[str, tuple[int, int]]) -> ShardItem | Record:
    ident, name = f"{tar.name}:{key}", str(tar)
    ext = next((e for e in _INDEXED_IMAGES if e in members), None)
    if ext is None:
        return Record(ident, name, source_row, error="sample has no image member (.png/.jpg/.npy)")
    offset, size = members[ext]
    if offset + size > real:
        return Record(ident, name, source_row, error="truncated shard: the image member runs past the end of the file")
    meta = members.get("json")
    if meta is not None and meta[0] + meta[1] > real:
        meta = None
    return ShardItem(name, key, source_row, ext, offset, size, *(meta or (None, 0)))


def _tail_is_garbage(tar: Path, end: int) -> bool:
    """True when the bytes after the last member are not the zero end-of-archive blocks.

    ``tarfile`` ends iteration quietly at a header cut short, so this is how a shard truncated
    inside a header is told apart from a complete one.
    """
    with open(tar, "rb") as fh:
        fh.seek(-(-end // 512) * 512)
        while block := fh.read(1 << 16):
            if block.count(0) != len(block):
                return True
    return False


def read_items(items: Sequence[ShardItem]) -> list[Record]:
    """The records of indexed samples, reading only their members; one that cannot be read gets ``error``."""
    handles: dict[str, IO[bytes]] = {}
    try:
        return [_read_item(it, handles) for it in items]
    finally:
        for fh in handles.values():
            fh.close()


def _read_item(it: ShardItem, handles: dict[str, IO[bytes]]) -> Record:
    sample: dict[str, Any] = {"__url__": it.tar, "__key__": it.key, "__source_row__": it.source_row}
    record = Record(f"{Path(it.tar).name}:{it.key}", it.tar, it.source_row)
    try:
        fh = handles.get(it.tar) or handles.setdefault(it.tar, open(it.tar, "rb"))
        if it.meta_offset is not None:
            fh.seek(it.meta_offset)
            sample["json"] = fh.read(it.meta_size)
            record = record_of(sample, decode=False)
        fh.seek(it.offset)
        data = fh.read(it.size)
        if len(data) != it.size:
            raise EOFError(f"image member truncated ({len(data)} of {it.size} bytes)")
        sample["jpg" if it.ext == "jpeg" else it.ext] = data
        record.image = decode_image(sample)
    except Exception as exc:  # a bad sample is an error row of the catalog, never a crash
        record.error = error_text(exc)
    return record
