"""Storage of synthetic (data-free) calibration sets: shards + one JSON manifest.

A set is a folder::

    DIR/manifest.json                   the index (written last, atomically)
    DIR/synth_r{rank:02d}_b{batch:05d}.pt  one shard per generation batch
    DIR/.parts/manifest.r{rank:02d}.json  per-rank progress (merged into manifest.json by rank 0)

``manifest.json``::

    {"format": "qwt-synth-v1", "task": "detection" | "classification", "seed": int,
     "hparams": {...}, "label_source": "sampled" | "coco" | "uniform" | ...,
     "teacher": {"config" | "model": str, "checkpoint": str | null, "checkpoint_sha256": str},
     "input_space": "normalized", "mean": [3 floats], "std": [3 floats], "image_size": [H, W],
     "num_images": planned total, "batch_size": int, "complete": bool,
     "shards": [{"file", "batch", "num_images", "sha256"}, ...]}   (sorted by batch)

A shard is ``torch.save`` of ``{"images": float32 (B, 3, H, W) in the teacher's *normalized* input
space, "targets": per-image list, "metainfo": per-image list of dicts, "batch": int,
"indices": [global image indices]}``. Detection targets are ``{"bboxes": (n, 4) float xyxy pixels,
"labels": (n,) long, "masks": (n, H, W) uint8}``; classification targets are class indices (int).

Safety: shards and manifests are written to a temporary name and ``os.replace``-d into place, the
manifest only after its shards, so a crash never leaves a half-written file under a final name; the
reader only opens shards listed in ``manifest.json`` and checks each one's sha256 before using it.
Resuming: a batch whose shard is already listed (with a matching file) is skipped.
Real pixels are never stored: writers only receive optimised tensors.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

FORMAT = "qwt-synth-v1"
MANIFEST = "manifest.json"
PARTS_DIR = ".parts"
SHARD_RE = re.compile(r"^synth_r(\d{2,})_b(\d{5,})\.pt$")
TASKS = ("detection", "classification")

__all__ = ["FORMAT", "SynthSetError", "SynthManifest", "SyntheticSet", "shard_name", "write_shard",
           "load_synthetic_set", "file_sha256", "state_dict_sha256", "batch_indices", "rank_batches",
           "merge_parts"]


class SynthSetError(ValueError):
    """A synthetic set that cannot be used (missing, empty, corrupt, foreign); one-line message."""


# ------------------------------------------------------------------------------------------ hashing
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 over a model's state dict (names, dtypes, shapes, values); identifies a teacher
    that has no checkpoint file (e.g. random init in tests)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------ atomic write
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# -------------------------------------------------------------------------------------- scheduling
def shard_name(rank: int, batch: int) -> str:
    """``synth_r{rank:02d}_b{batch:05d}.pt``."""
    return f"synth_r{rank:02d}_b{batch:05d}.pt"


def batch_indices(batch: int, batch_size: int, num_images: int) -> list[int]:
    """Global image indices of generation batch ``batch`` (the last batch may be shorter)."""
    start = batch * batch_size
    return list(range(start, min(start + batch_size, num_images)))


def rank_batches(num_images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Generation batches of ``rank``: ``rank, rank + W, ...`` of ``ceil(N / B)``. The batch layout
    does not depend on ``world_size``, so a batch (seeded by its global image indices) comes out the
    same whichever rank makes it."""
    n_batches = (num_images + batch_size - 1) // batch_size
    return list(range(rank, n_batches, world_size))


# ---------------------------------------------------------------------------------------- manifest
@dataclass
class SynthManifest:
    """The JSON index of a synthetic set (see the module docstring for the fields)."""

    task: str
    seed: int
    hparams: dict[str, Any]
    label_source: str
    teacher: dict[str, Any]
    mean: list[float]
    std: list[float]
    image_size: list[int]
    num_images: int
    batch_size: int
    input_space: str = "normalized"
    format: str = FORMAT
    complete: bool = False
    shards: list[dict[str, Any]] = field(default_factory=list)

    # Fields that must agree for two runs to be parts of the same set (resume / multi-rank).
    IDENTITY = ("format", "task", "seed", "hparams", "label_source", "teacher", "mean", "std",
                "image_size", "num_images", "batch_size", "input_space")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        self.image_size = [int(v) for v in self.image_size]

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("format", "task", "seed", "hparams", "label_source", "teacher",
                                         "input_space", "mean", "std", "image_size", "num_images",
                                         "batch_size", "complete")}
        d["shards"] = sorted(self.shards, key=lambda s: s["batch"])
        return d

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        return json.loads(json.dumps({k: d[k] for k in self.IDENTITY}))  # normalise tuples → lists

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "SynthManifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise SynthSetError(f"{where}: format {got!r} is not {FORMAT!r}; not a synthetic set written "
                                "by qwt_core.synth_io")
        missing = [k for k in ("task", "seed", "hparams", "label_source", "teacher", "mean", "std",
                               "image_size", "num_images", "batch_size", "shards") if k not in d]
        if missing:
            raise SynthSetError(f"{where}: missing fields {missing}; the manifest is damaged, synthesize again")
        if d.get("input_space", "normalized") != "normalized":
            raise SynthSetError(f"{where}: input_space {d.get('input_space')!r} is not 'normalized'")
        return cls(task=d["task"], seed=int(d["seed"]), hparams=d["hparams"], label_source=d["label_source"],
                   teacher=d["teacher"], mean=d["mean"], std=d["std"], image_size=d["image_size"],
                   num_images=int(d["num_images"]), batch_size=int(d["batch_size"]),
                   input_space=d.get("input_space", "normalized"), complete=bool(d.get("complete", False)),
                   shards=list(d["shards"]))

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "SynthManifest":
        """Read ``folder/manifest.json``; :class:`SynthSetError` when missing or unreadable."""
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise SynthSetError(f"synthetic set folder not found: {folder}; run the synthesize command "
                                "first or fix --synth_dir")
        if not path.is_file():
            raise SynthSetError(f"{path} not found: {folder} holds no finished synthetic set "
                                "(empty, or synthesis never completed a batch); run the synthesize command")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SynthSetError(f"{path} is not valid JSON ({type(exc).__name__}); the set is damaged, "
                                "synthesize it again") from None
        return cls.from_dict(d, str(path))

    def write(self, folder: str | os.PathLike) -> None:
        """Write ``folder/manifest.json`` atomically."""
        _atomic_write_json(Path(folder) / MANIFEST, self.to_dict())

    @property
    def images_written(self) -> int:
        return sum(int(s["num_images"]) for s in self.shards)


def _part_path(folder: Path, rank: int) -> Path:
    return folder / PARTS_DIR / f"manifest.r{rank:02d}.json"


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_folder(folder: str | os.PathLike, manifest: SynthManifest, rank: int = 0) -> dict[int, dict]:
    """Check that ``folder`` is empty or holds (part of) the *same* set; returns the shards already
    done, by batch index, whose files exist with the recorded sha256 (resume).

    Raises :class:`SynthSetError` (nothing written) if the folder holds a different set.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SynthSetError(f"--out {folder} exists and is not a folder")
    want = manifest.identity()
    done: dict[int, dict] = {}
    sources = [folder / MANIFEST] + sorted((folder / PARTS_DIR).glob("manifest.r*.json"))
    for path in sources:
        if not path.is_file():
            continue
        d = _read_json(path)
        if d is None:
            continue  # parts are written atomically; an unreadable one is ignored and redone
        try:
            old = SynthManifest.from_dict(d, str(path)).identity()
        except SynthSetError as exc:
            raise SynthSetError(f"{folder} holds something else ({exc}); pick an empty --out folder") from None
        if old != want:
            diff = sorted(k for k in want if old.get(k) != want.get(k))
            raise SynthSetError(f"{folder} holds a synthetic set made with other settings (differs in "
                                f"{', '.join(diff)}); use a new --out folder or the same settings to resume")
        for s in d.get("shards", []):
            f = folder / s["file"]
            if int(s["batch"]) not in done and f.is_file() and file_sha256(f) == s["sha256"]:
                done[int(s["batch"])] = s
    return done


def write_shard(folder: str | os.PathLike, manifest: SynthManifest, rank: int, batch: int,
                images: torch.Tensor, targets: Sequence[Any], metainfo: Sequence[dict],
                indices: Sequence[int], world_size: int = 1) -> dict[str, Any]:
    """Write one shard atomically, then record it (per-rank part; rank 0 also rewrites
    ``manifest.json``). Returns the shard entry ``{"file", "batch", "num_images", "sha256"}``.

    images: ``(B, 3, H, W)`` float32 in the normalized space; targets / metainfo / indices: B each.
    """
    folder = Path(folder)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    b = images.shape[0]
    if not (len(targets) == len(metainfo) == len(indices) == b):
        raise ValueError(f"{b} images but {len(targets)} targets / {len(metainfo)} metainfo / "
                         f"{len(indices)} indices")
    if list(images.shape[-2:]) != list(manifest.image_size):
        raise ValueError(f"images are {tuple(images.shape[-2:])}, manifest says {manifest.image_size}")
    payload = {"images": images.detach().to("cpu", torch.float32).contiguous(),
               "targets": [_to_cpu(t) for t in targets], "metainfo": [dict(m) for m in metainfo],
               "batch": int(batch), "indices": [int(i) for i in indices]}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    name = shard_name(rank, batch)
    _atomic_write_bytes(folder / name, data)
    entry = {"file": name, "batch": int(batch), "num_images": b, "sha256": hashlib.sha256(data).hexdigest()}
    part_path = _part_path(folder, rank)
    part = _read_json(part_path) or {**manifest.to_dict(), "shards": []}
    part["shards"] = [s for s in part.get("shards", []) if int(s["batch"]) != batch] + [entry]
    part["complete"] = False
    _atomic_write_json(part_path, part)
    if rank == 0:
        merge_parts(folder, manifest, final=False)
    return entry


def _to_cpu(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu()
    if isinstance(t, dict):
        return {k: _to_cpu(v) for k, v in t.items()}
    return t


def merge_parts(folder: str | os.PathLike, manifest: SynthManifest, final: bool = True) -> SynthManifest:
    """Rank 0: gather every rank's recorded shards (whose files exist) into ``manifest.json``.

    ``final``: all ranks are done; ``complete`` is set when every planned image is present.
    """
    folder = Path(folder)
    by_batch: dict[int, dict] = {}
    sources = [folder / MANIFEST] + sorted((folder / PARTS_DIR).glob("manifest.r*.json"))
    for path in sources:
        d = _read_json(path) if path.is_file() else None
        for s in (d or {}).get("shards", []):
            if (folder / s["file"]).is_file():
                by_batch[int(s["batch"])] = s
    manifest.shards = [by_batch[k] for k in sorted(by_batch)]
    manifest.complete = final and manifest.images_written == manifest.num_images
    manifest.write(folder)
    return manifest


# ------------------------------------------------------------------------------------------ reader
class SyntheticSet:
    """A validated synthetic set; images are read shard by shard (sha256-checked on load).

    ``len(s)`` images; ``s[i]`` → ``{"image": (3, H, W), "target": ..., "metainfo": dict}``;
    :meth:`images` / :meth:`batches` give stacked tensors for calibration.
    """

    def __init__(self, folder: Path, manifest: SynthManifest) -> None:
        self.folder = folder
        self.manifest = manifest
        self._offsets: list[int] = []
        total = 0
        for s in manifest.shards:
            self._offsets.append(total)
            total += int(s["num_images"])
        self._len = total
        self._cache: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return self._len

    @property
    def task(self) -> str:
        return self.manifest.task

    def load_shard(self, k: int) -> dict[str, Any]:
        """Shard ``k`` of the manifest (in batch order), checked against its sha256 and layout."""
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        entry = self.manifest.shards[k]
        path = self.folder / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SynthSetError(f"cannot read shard {path} ({type(exc).__name__}); the set is incomplete, "
                                "synthesize again (resuming redoes missing shards)") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SynthSetError(f"shard {path} is corrupt (sha256 differs from manifest.json); delete it "
                                "and run the synthesize command again to redo it")
        try:
            shard = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling problem is a corrupt shard
            raise SynthSetError(f"shard {path} cannot be loaded ({type(exc).__name__}); delete it and "
                                "synthesize again") from None
        imgs = shard.get("images") if isinstance(shard, dict) else None
        n = int(entry["num_images"])
        if (not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or imgs.shape[0] != n
                or list(imgs.shape[-2:]) != list(self.manifest.image_size)
                or len(shard.get("targets", [])) != n or len(shard.get("metainfo", [])) != n):
            raise SynthSetError(f"shard {path} does not match manifest.json (images/targets/metainfo "
                                "shapes); synthesize the set again")
        self._cache = (k, shard)
        return shard

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._len:
            raise IndexError(f"image {i} out of range (set has {self._len})")
        lo, hi = 0, len(self._offsets) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._offsets[mid] <= i:
                lo = mid
            else:
                hi = mid - 1
        return lo, i - self._offsets[lo]

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, j = self._locate(i)
        shard = self.load_shard(k)
        return {"image": shard["images"][j], "target": shard["targets"][j], "metainfo": shard["metainfo"][j]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for k in range(len(self.manifest.shards)):
            shard = self.load_shard(k)
            for j in range(int(self.manifest.shards[k]["num_images"])):
                yield {"image": shard["images"][j], "target": shard["targets"][j],
                       "metainfo": shard["metainfo"][j]}

    def items(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The items at ``indices`` (sorted reads, returned in the order asked)."""
        return [self[i] for i in indices]

    def images(self, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``(n, 3, H, W)`` images at ``indices`` (default all)."""
        idx = range(self._len) if indices is None else indices
        items = self.items(list(idx))
        if not items:
            raise SynthSetError(f"{self.folder}: no images selected")
        return torch.stack([it["image"] for it in items])

    def batches(self, batch_size: int, indices: Optional[Sequence[int]] = None) -> Iterator[torch.Tensor]:
        """Images at ``indices`` (default all) as ``(≤batch_size, 3, H, W)`` batches, in order."""
        idx = list(range(self._len) if indices is None else indices)
        for s in range(0, len(idx), batch_size):
            yield self.images(idx[s:s + batch_size])


def load_synthetic_set(folder: str | os.PathLike, expected_teacher: Optional[dict[str, Any]] = None,
                       task: Optional[str] = None, require_complete: bool = True) -> SyntheticSet:
    """Open and validate a synthetic set.

    Args:
        folder: the set's folder (holds ``manifest.json``).
        expected_teacher: fields that must equal the manifest's ``teacher`` entry, e.g.
            ``{"checkpoint_sha256": ...}`` or ``{"model": "deit_tiny"}`` (None: no check).
        task: ``"detection"`` / ``"classification"`` to reject a set of the other task.
        require_complete: reject a set whose synthesis has not finished.
    Raises:
        SynthSetError: one line naming the problem (empty/corrupt folder, foreign teacher, ...).
    """
    folder = Path(folder)
    manifest = SynthManifest.read(folder)
    if task is not None and manifest.task != task:
        raise SynthSetError(f"{folder} holds a {manifest.task} set, not a {task} set")
    if expected_teacher:
        for key, want in expected_teacher.items():
            got = manifest.teacher.get(key)
            if want is not None and got != want:
                raise SynthSetError(
                    f"{folder} was synthesized from a different model ({key} {str(got)[:16]!s} != "
                    f"{str(want)[:16]!s}); synthesize a set with this teacher")
    if not manifest.shards:
        raise SynthSetError(f"{folder}: manifest.json lists no shards (empty set); run the synthesize command")
    if require_complete and not manifest.complete:
        raise SynthSetError(f"{folder}: synthesis is unfinished ({manifest.images_written} of "
                            f"{manifest.num_images} images); rerun the synthesize command to resume it")
    for s in manifest.shards:
        if not SHARD_RE.match(str(s.get("file", ""))) or not (folder / s["file"]).is_file():
            raise SynthSetError(f"{folder}: shard {s.get('file')!r} listed in manifest.json is missing; "
                                "rerun the synthesize command to redo it")
    return SyntheticSet(folder, manifest)
