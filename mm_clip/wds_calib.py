"""Calibration pairs drawn uniformly from *all* webdataset shards (seeded, exact count).

Each shard's tar headers are scanned once (members grouped into samples the webdataset way: the key
is the member path up to the first dot of its file name); the index is cached per shard (path, size,
mtime). ``n`` global sample indices are then drawn without replacement from ``range(total)`` with
``random.Random(seed)``, so every pair in every shard is equally likely, the draw does not depend on
shard order on disk beyond the sorted shard list, and the count is exactly ``n``. Only the chosen
members are read (by seeking to their offsets).
"""
from __future__ import annotations

import bisect
import glob
import hashlib
import io
import json
import os
import random
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from braceexpand import braceexpand
from PIL import Image
from tqdm.auto import tqdm

from .errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
INDEX_VERSION = 1
DEFAULT_INDEX_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "qwt-toolkit", "wds-index")


@dataclass(frozen=True)
class Member:
    """One tar member: name, byte offset of its data in the (uncompressed) tar, size in bytes."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class SampleRef:
    """Where one image-caption pair lives."""

    shard: str
    key: str
    image: Member
    text: Member


def expand_shards(pattern: Optional[str]) -> list[str]:
    """Brace-expand (and glob) a shard pattern; ``::`` separates several patterns.

    Raises :class:`InputError` when the pattern is missing, matches no file, or names missing shards.
    """
    if not pattern:
        raise InputError("--train-data is required for calibration: pass a shard pattern such as "
                         "'/data/cc3m/cc3m-train-{0000..0575}.tar' (quote it so the shell keeps the braces)")
    paths: list[str] = []
    for part in pattern.split("::"):
        for p in braceexpand(part):
            if any(c in p for c in "*?["):
                paths.extend(sorted(glob.glob(p)))
            else:
                paths.append(p)
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or len(missing) == len(paths):
        raise InputError(f"--train-data {pattern!r} matches no files (e.g. {paths[0] if paths else pattern}"
                         " does not exist): check the directory and the brace range")
    if missing:
        raise InputError(f"{len(missing)} of {len(paths)} shards of --train-data do not exist, e.g. "
                         f"{missing[0]}: fix the brace range or the directory")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` → (``dir/000123``, ``jpg``); the extension is everything after the first dot
    of the file name, lower-cased."""
    head, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(head, stem) if head else stem), ext.lower()


def scan_shard(path: str) -> list[SampleRef]:
    """Read a shard's tar headers and return its complete image-caption samples, in tar order."""
    groups: dict[str, dict[str, Member]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = _split_key(info.name)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = Member(info.name, info.offset_data, info.size)
    except tarfile.TarError as e:
        raise InputError(f"{path}: not an uncompressed tar shard ({e})") from None
    samples = []
    for key in order:
        members = groups[key]
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is not None and TEXT_EXT in members:
            samples.append(SampleRef(path, key, image, members[TEXT_EXT]))
    return samples


def _cache_file(cache_dir: str, path: str) -> str:
    st = os.stat(path)
    ident = f"{INDEX_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return os.path.join(cache_dir, hashlib.sha1(ident.encode()).hexdigest() + ".json")


def index_shard(path: str, cache_dir: Optional[str] = DEFAULT_INDEX_CACHE) -> list[SampleRef]:
    """:func:`scan_shard` with an on-disk cache (``cache_dir=None`` disables it)."""
    cache = _cache_file(cache_dir, path) if cache_dir else None
    if cache and os.path.isfile(cache):
        try:
            with open(cache) as f:
                rows = json.load(f)
            return [SampleRef(path, k, Member(*im), Member(*tx)) for k, im, tx in rows]
        except (OSError, ValueError, TypeError):
            pass  # unreadable cache: rebuild it
    samples = scan_shard(path)
    if cache:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump([[s.key, [s.image.name, s.image.offset, s.image.size],
                            [s.text.name, s.text.offset, s.text.size]] for s in samples], f)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only cache location only costs a rescan next time
    return samples


def index_shards(shards: Sequence[str], workers: int = 4, cache_dir: Optional[str] = DEFAULT_INDEX_CACHE,
                 progress: bool = True) -> list[list[SampleRef]]:
    """Index every shard (in parallel threads); the result follows the order of ``shards``."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = pool.map(lambda p: index_shard(p, cache_dir), shards)
        return list(tqdm(it, total=len(shards), desc="index shards", disable=not progress))


def draw_samples(indexes: Sequence[Sequence[SampleRef]], n: int, seed: int) -> list[SampleRef]:
    """Exactly ``n`` distinct samples drawn uniformly from all shards, in draw order.

    Raises :class:`InputError` if the shards hold fewer than ``n`` complete pairs.
    """
    counts = [len(ix) for ix in indexes]
    total = sum(counts)
    if n <= 0:
        raise InputError(f"the number of calibration samples must be positive, got {n}")
    if total < n:
        raise InputError(f"--train-data holds {total} image-caption pairs, fewer than the {n} requested "
                         "calibration samples: add shards or lower --iter/--calib-size")
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    picks = random.Random(seed).sample(range(total), n)
    out = []
    for g in picks:
        s = bisect.bisect_right(starts, g) - 1
        out.append(indexes[s][g - starts[s]])
    return out


def read_pairs(refs: Sequence[SampleRef], progress: bool = True) -> list[tuple[Image.Image, str]]:
    """Read and decode the chosen samples: ``(RGB PIL image, caption)`` in the order of ``refs``."""
    by_shard: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        by_shard.setdefault(r.shard, []).append(i)
    out: list[Optional[tuple[Image.Image, str]]] = [None] * len(refs)
    bar = tqdm(total=len(refs), desc="read calibration pairs", disable=not progress)
    for shard, idx in by_shard.items():
        with open(shard, "rb") as f:
            for i in sorted(idx, key=lambda j: refs[j].image.offset):
                r = refs[i]
                f.seek(r.image.offset)
                img_bytes = f.read(r.image.size)
                f.seek(r.text.offset)
                caption = f.read(r.text.size).decode("utf-8", errors="replace").strip()
                try:
                    image = Image.open(io.BytesIO(img_bytes)).convert("RGB")
                except OSError as e:
                    raise InputError(f"{shard}: cannot decode {r.image.name} ({e})") from None
                out[i] = (image, caption)
                bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]


def sample_calibration_pairs(pattern: Optional[str], n: int, seed: int, workers: int = 4,
                             cache_dir: Optional[str] = DEFAULT_INDEX_CACHE, progress: bool = True
                             ) -> tuple[list[tuple[Image.Image, str]], list[SampleRef], int]:
    """Expand ``pattern``, index all shards and draw ``n`` pairs uniformly across them.

    Returns ``(pairs, refs, total)``: the decoded pairs, where each came from, and how many complete
    pairs the shards hold.
    """
    shards = expand_shards(pattern)
    indexes = index_shards(shards, workers, cache_dir, progress)
    refs = draw_samples(indexes, n, seed)
    return read_pairs(refs, progress), refs, sum(len(ix) for ix in indexes)
