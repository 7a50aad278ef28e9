"""Load a YOLO detector from a local checkpoint or a model yaml (random init), no network.

Two families:

* ``"ultralytics"`` — Ultralytics ``DetectionModel`` (YOLO11, YOLOv8, YOLOv5u, ...): ``*.pt``
  checkpoints written by Ultralytics and every yaml Ultralytics knows (``yolo11n.yaml``,
  ``yolov5nu.yaml``, ...).
* ``"yolov5"`` — the original anchor-based YOLOv5 (v7.0 model code, the ``yolov5`` PyPI package,
  installed without its dependencies by ``make yolo``): ``yolov5{n,s,m,l,x}.yaml`` (no ``u``) and
  checkpoints of ultralytics/yolov5. This is the architecture of the zero-shot QAT paper's YOLOv5
  rows; Ultralytics' ``yolov5nu.yaml`` is a different, anchor-free model with the YOLOv8 head.

Both expose ``model.model`` (an ``nn.Sequential`` whose layers carry ``f`` (inputs), ``i`` (index))
and ``model.save`` (indices whose outputs later layers read), which is all the layer walk needs.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

import torch
from torch import nn

from . import __name__ as _pkg  # noqa: F401  (sets YOLO_OFFLINE before Ultralytics is imported)

Family = Literal["ultralytics", "yolov5"]
FAMILIES: tuple[str, ...] = ("auto", "ultralytics", "yolov5")
_V5_ORIGINAL_YAML = re.compile(r"^yolov5[nsmlx]6?\.ya?ml$")


class ModelSpecError(ValueError):
    """A model argument that cannot be loaded (missing file, not a YOLO checkpoint, unknown yaml)."""


@dataclass
class Detector:
    """A loaded detector.

    Attributes:
        model: the ``DetectionModel`` (eval mode, fp32); ``model.model[i]`` are its layers.
        family: ``"ultralytics"`` or ``"yolov5"`` (original anchor-based code).
        source: the path or yaml name it was built from.
        names: ``{class index: name}``.
    """

    model: nn.Module
    family: str
    source: str
    names: dict[int, str] = field(default_factory=dict)

    def for_validator(self) -> nn.Module:
        """The module handed to Ultralytics' validator: the model itself (Ultralytics family) or a
        view of the original YOLOv5 whose output has the Ultralytics layout (see :class:`V5View`)."""
        if self.family == "yolov5":
            return V5View(self.model, self.names)
        return self.model

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (family, source, layer count, parameters, Conv2d count)."""
        m = self.model
        return {"family": self.family, "source": self.source, "layers": len(m.model),
                "parameters": int(sum(p.numel() for p in m.parameters())),
                "conv2d": int(sum(isinstance(x, nn.Conv2d) for x in m.modules())),
                "nc": len(self.names)}


class V5View(nn.Module):
    """The original YOLOv5 seen through Ultralytics' output convention, for its validator and NMS.

    forward: images ``(B, 3, H, W)`` → ``(B, 4 + nc, A)``: rows 0..3 box centre/size in pixels,
    then per-class scores ``objectness · p(class)`` (the score YOLOv5's own NMS thresholds).
    Deliberately no ``fuse`` method: Ultralytics' AutoBackend only fuses models that have one.
    """

    def __init__(self, model: nn.Module, names: dict[int, str]) -> None:
        super().__init__()
        self.model = model
        self.names = dict(names)
        self.stride = model.stride

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.model(x)
        pred = out[0] if isinstance(out, (tuple, list)) else out   # (B, A, 5 + nc)
        scores = pred[..., 5:] * pred[..., 4:5]
        return torch.cat([pred[..., :4], scores], dim=-1).transpose(1, 2)


def _v5_package_dir() -> str:
    try:
        import yolov5  # noqa: F401
        from yolov5.models.yolo import DetectionModel  # noqa: F401
    except Exception as e:  # ImportError, or a missing optional dependency of the package
        raise ModelSpecError(f"the original YOLOv5 model code is not importable ({type(e).__name__}: {e}); "
                             "install it with `make yolo`, or use Ultralytics' yolov5nu.yaml "
                             "(anchor-free, a different model)") from None
    return os.path.dirname(sys.modules["yolov5"].__file__)


def yolov5_available() -> bool:
    """True if the original YOLOv5 model code (``yolov5`` package) imports."""
    try:
        _v5_package_dir()
        return True
    except ModelSpecError:
        return False


@contextlib.contextmanager
def _v5_module_aliases() -> Iterator[None]:
    """ultralytics/yolov5 checkpoints pickle ``models.yolo.DetectionModel``: alias ``models`` and
    ``utils`` to the package's modules while unpickling."""
    import yolov5.models
    import yolov5.utils
    saved = {k: sys.modules.get(k) for k in ("models", "utils")}
    sys.modules["models"], sys.modules["utils"] = yolov5.models, yolov5.utils
    for sub in ("yolo", "common", "experimental"):
        sys.modules[f"models.{sub}"] = sys.modules.get(f"yolov5.models.{sub}") or \
            __import__(f"yolov5.models.{sub}", fromlist=["_"])
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for sub in ("yolo", "common", "experimental"):
            sys.modules.pop(f"models.{sub}", None)


def _names(raw: Any, nc: int) -> dict[int, str]:
    if isinstance(raw, dict):
        return {int(k): str(v) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):
        return {i: str(v) for i, v in enumerate(raw)}
    return {i: str(i) for i in range(nc)}


def _resolve_family(spec: str, family: str) -> str:
    if family not in FAMILIES:
        raise ModelSpecError(f"family={family!r}: use one of {', '.join(FAMILIES)}")
    if family != "auto":
        return family
    if spec.endswith((".yaml", ".yml")) and _V5_ORIGINAL_YAML.match(os.path.basename(spec)):
        return "yolov5"
    return "ultralytics"


def load_detector(spec: str, nc: Optional[int] = None, names: Optional[dict[int, str]] = None,
                  family: str = "auto") -> Detector:
    """Build or load a detector, on the CPU, in eval mode, fp32.

    Args:
        spec: a local ``.pt`` checkpoint, or a model yaml (a file, or a name Ultralytics / the
            yolov5 package ships, e.g. ``yolo11n.yaml``, ``yolov5n.yaml``): random init.
        nc, names: class count and names for a yaml model (from the dataset yaml); ignored for
            checkpoints, which carry their own.
        family: ``"auto"`` (original YOLOv5 for ``yolov5{n,s,m,l,x}.yaml``, Ultralytics otherwise;
            checkpoints are recognised by their content), ``"ultralytics"`` or ``"yolov5"``.
    Raises:
        ModelSpecError: one line, for a missing file, a file that is not a YOLO checkpoint, an
            unknown yaml or a family that is not installed.
    """
    spec = str(spec)
    fam = _resolve_family(spec, family)
    is_yaml = spec.endswith((".yaml", ".yml"))
    if not is_yaml:
        if not spec.endswith(".pt"):
            raise ModelSpecError(f"--model {spec!r}: give a local .pt checkpoint or a model .yaml")
        if not os.path.isfile(spec):
            raise ModelSpecError(f"--model {spec!r}: no such file (local checkpoints only, nothing is "
                                 "downloaded)")
        return _load_checkpoint(spec, family)
    if fam == "yolov5":
        pkg = _v5_package_dir()
        from yolov5.models.yolo import DetectionModel as V5Model
        path = spec if os.path.isfile(spec) else os.path.join(pkg, "models", os.path.basename(spec))
        if not os.path.isfile(path):
            raise ModelSpecError(f"--model {spec!r}: no such yaml (the yolov5 package ships "
                                 "yolov5{n,s,m,l,x}.yaml)")
        try:
            with _quiet():
                model = V5Model(path, ch=3, nc=nc)
        except Exception as e:
            raise ModelSpecError(f"--model {spec!r} is not a YOLOv5 model yaml ({type(e).__name__}: {e})") from None
        model.names = _names(names, model.yaml["nc"])
        return _finish(Detector(model, "yolov5", spec, model.names))
    from ultralytics.nn.tasks import DetectionModel
    try:
        with _quiet():
            model = DetectionModel(spec, nc=nc, verbose=False)
    except FileNotFoundError:
        raise ModelSpecError(f"--model {spec!r}: no such yaml (neither a file nor a model Ultralytics "
                             "ships)") from None
    except Exception as e:
        raise ModelSpecError(f"--model {spec!r} is not a YOLO model yaml ({type(e).__name__}: {e})") from None
    model.names = _names(names, model.yaml["nc"])
    return _finish(Detector(model, "ultralytics", spec, model.names))


def _load_checkpoint(path: str, family: str) -> Detector:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        if "models" in str(e) and yolov5_available():   # an ultralytics/yolov5 checkpoint
            with _v5_module_aliases():
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            raise ModelSpecError(f"--model {path!r} is not a readable PyTorch checkpoint "
                                 f"({type(e).__name__})") from None
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module) or not hasattr(model, "model") or not hasattr(model, "save"):
        raise ModelSpecError(f"--model {path!r} is not a YOLO detection checkpoint (no DetectionModel "
                             "under 'model' or 'ema')")
    mod = type(model).__module__
    fam = "yolov5" if not mod.startswith("ultralytics") else "ultralytics"
    if family not in ("auto", fam):
        raise ModelSpecError(f"--model {path!r} holds a {fam} model, not {family}")
    model = model.float()
    nc = int(getattr(model, "nc", None) or model.yaml.get("nc", 80))
    return _finish(Detector(model, fam, path, _names(getattr(model, "names", None), nc)))


def _finish(det: Detector) -> Detector:
    det.model.float().eval()
    for p in det.model.parameters():
        p.requires_grad_(False)
    return det


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the model-summary tables both model builders print."""
    import logging
    loggers = [logging.getLogger(n) for n in ("ultralytics", "yolov5")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
