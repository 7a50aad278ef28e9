"""The one registry of classification models: script name → timm architecture, weights, preprocessing.

Weights are looked up in this order (:meth:`ModelSpec.build`):

1. an explicit ``--checkpoint`` file (state dict in ``.pth``/``.pt``/``.bin``/``.safetensors``,
   optionally wrapped as ``{'model': sd}`` / ``{'state_dict': sd}``; ViT also ``.npz``);
2. a file in ``pretrained_weights/`` named as listed by :meth:`ModelSpec.weight_file_names`
   (see ``pretrained_weights/README.md``);
3. the timm hub (``pretrained=True``), when the machine is online or the HF cache has the weights.

Pretrained tags are the ones matching the QwT / RepQ-ViT baselines: DeiT ``fb_in1k`` (the DeiT
release), ViT ``augreg_in21k_ft_in1k`` (FP 81.4 / 84.5), Swin ``ms_in1k`` (the Swin release),
ResNet ``tv_in1k`` (the torchvision weights used by the PTQ literature: 69.8 / 76.1 / 77.4).
"""
from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Literal, Optional

import timm
import torch
from torch import nn

from qwt_core.model_io import state_dict_mismatch

Family = Literal["vit", "swin", "resnet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_DIR = os.path.join(ROOT, "pretrained_weights")
WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")


class CheckpointError(SystemExit):
    """A weights problem, reported as one line (``SystemExit`` so the scripts exit non-zero)."""


@dataclass(frozen=True)
class ModelSpec:
    """One script model name.

    Attributes:
        name: the ``--model`` value (e.g. ``deit_small``).
        family: adapter family: ``vit`` (ViT/DeiT incl. distilled), ``swin`` or ``resnet``.
        timm_name: timm architecture (``deit_small_patch16_224``).
        tag: timm pretrained tag matching the reference baseline (``fb_in1k``).
        crop_pct, mean, std, interpolation: eval preprocessing (resize short side to
            ``floor(img_size / crop_pct)``, center crop ``img_size``).
    """

    name: str
    family: Family
    timm_name: str
    tag: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    img_size: int = 224

    @property
    def hub_name(self) -> str:
        """``timm_name.tag``, the name ``timm.create_model(..., pretrained=True)`` downloads."""
        return f"{self.timm_name}.{self.tag}"

    def resize_size(self, img_size: Optional[int] = None) -> int:
        """Short-side resize before the center crop: ``floor(img_size / crop_pct)``."""
        return int(math.floor((img_size or self.img_size) / self.crop_pct))

    def weight_file_names(self) -> list[str]:
        """File names looked up in ``pretrained_weights/`` (first existing one wins)."""
        names = [self.hub_name + ext for ext in WEIGHT_EXTENSIONS]
        names += [self.name + ext for ext in WEIGHT_EXTENSIONS]
        return names + [f for f in [self.upstream_file(), PAPER_WEIGHT_FILES.get(self.name)] if f]

    def upstream_file(self) -> Optional[str]:
        """File name of the original release (DeiT / Swin / torchvision / AugReg), from timm's cfg."""
        cfg = timm.models.get_pretrained_cfg(self.hub_name)
        url = getattr(cfg, "url", None) or ""
        base = url.rsplit("/", 1)[-1]
        return base if base.endswith((".pth", ".npz")) else None

    def cached_hub_file(self) -> Optional[str]:
        """The timm hub weights of this model in the local Hugging Face cache, if any."""
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        cfg = timm.models.get_pretrained_cfg(self.hub_name)
        repo = getattr(cfg, "hf_hub_id", None)
        for fname in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(repo, fname) if repo else None
            if isinstance(path, str):
                return path
        return None

    def find_local_weights(self, weights_dir: str = WEIGHTS_DIR) -> Optional[str]:
        for fname in self.weight_file_names():
            path = os.path.join(weights_dir, fname)
            if os.path.isfile(path):
                return path
        return None

    def create(self, model_kwargs: Optional[dict[str, Any]] = None, pretrained: bool = False) -> nn.Module:
        """The bare timm model (random init unless ``pretrained``), in eval mode."""
        name = self.hub_name if pretrained else self.timm_name
        return timm.create_model(name, pretrained=pretrained, **(model_kwargs or {})).eval()

    def build(self, checkpoint: Optional[str], pretrained: bool,
              model_kwargs: Optional[dict[str, Any]] = None,
              weights_dir: str = WEIGHTS_DIR) -> tuple[nn.Module, str]:
        """Build the model and load its weights.

        Args:
            checkpoint: explicit weights file (wins over everything else), or None.
            pretrained: False → random init (``--random-init``, for tests); True → checkpoint,
                then ``pretrained_weights/``, then the timm hub.
            model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size=32`` for tests).
            weights_dir: where to look for local weights.
        Returns:
            ``(model in eval mode, description of where the weights came from)``.
        Raises:
            CheckpointError: one line, when no weights can be loaded or they do not fit.
        """
        if checkpoint is not None:
            model = self.create(model_kwargs)
            load_checkpoint(model, checkpoint, self)
            return model, f"checkpoint {checkpoint}"
        if not pretrained:
            return self.create(model_kwargs), "random init"
        local = self.find_local_weights(weights_dir)
        if local is not None:
            model = self.create(model_kwargs)
            load_checkpoint(model, local, self)
            return model, f"local weights {local}"
        try:
            if hub_reachable():
                return self.create(model_kwargs, pretrained=True), f"timm hub {self.hub_name}"
            cached = self.cached_hub_file()
            if cached is None:
                raise RuntimeError("offline and not in the Hugging Face cache")
            model = timm.create_model(self.hub_name, pretrained=True,
                                      pretrained_cfg_overlay={"file": cached}, **(model_kwargs or {}))
            return model.eval(), f"cached timm weights {cached}"
        except Exception as exc:  # noqa: BLE001 - offline, no cache, hub errors: all mean "no weights"
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"error: no weights for {self.name}: pass --checkpoint FILE, or put one of "
                f"{', '.join(self.weight_file_names()[:2])} in {weights_dir}/ (see its README.md), "
                f"or go online for the timm hub ({self.hub_name}: {reason})") from None


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Quick check that the timm hub can be reached (avoids minutes of retries offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


#: checkpoints behind the published ResNet rows that differ from the registry's tag: the QwT ResNet
#: script loads BRECQ's ResNet-18 / ResNet-50 (torchvision layout, FP 71.0 / 76.6 in its table) and
#: torchvision's ResNet-101 (= ``upstream_file``). Looked up last in ``pretrained_weights/``.
PAPER_WEIGHT_FILES: dict[str, str] = {"resnet18": "resnet18_imagenet.pth.tar",
                                      "resnet50": "resnet50_imagenet.pth.tar"}


def _spec_list() -> list[ModelSpec]:
    deit = dict(family="vit", tag="fb_in1k", crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    vit = dict(family="vit", tag="augreg_in21k_ft_in1k", crop_pct=0.9, mean=HALF, std=HALF)
    swin = dict(family="swin", tag="ms_in1k", crop_pct=0.9, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    resnet = dict(family="resnet", tag="tv_in1k", crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    specs = [
        ModelSpec("vit_small", timm_name="vit_small_patch16_224", **vit),
        ModelSpec("vit_base", timm_name="vit_base_patch16_224", **vit),
    ]
    specs += [ModelSpec(f"deit_{size}", timm_name=f"deit_{size}_patch16_224", **deit)
              for size in ("tiny", "small", "base")]
    specs += [ModelSpec(f"deit_{size}_distilled", timm_name=f"deit_{size}_distilled_patch16_224", **deit)
              for size in ("tiny", "small", "base")]
    specs += [ModelSpec(f"swin_{size}", timm_name=f"swin_{size}_patch4_window7_224", **swin)
              for size in ("tiny", "small")]
    specs += [ModelSpec(f"resnet{depth}", timm_name=f"resnet{depth}", **resnet) for depth in (18, 50, 101)]
    return specs


#: script name → spec (the only model table of the classification scripts).
MODELS: dict[str, ModelSpec] = {s.name: s for s in _spec_list()}
FAMILY_MODELS: dict[str, list[str]] = {
    fam: [n for n, s in MODELS.items() if s.family == fam] for fam in ("vit", "swin", "resnet")}


def get_spec(name: str, choices: Optional[list[str]] = None) -> ModelSpec:
    """The spec of ``name``; one-line ``SystemExit`` listing the choices when unknown."""
    allowed = choices if choices is not None else list(MODELS)
    if name not in allowed:
        raise SystemExit(f"error: unknown model {name!r}; choose from: {', '.join(allowed)}")
    return MODELS[name]


# ----------------------------------------------------------------------------------- checkpoints
def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_ema", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return _unwrap(obj[key])
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state dict, got {type(obj).__name__}")
    return obj


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from ``{'model'|'state_dict': sd}`` and ``module.``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"error: checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad file for the user
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CheckpointError(f"error: cannot read checkpoint {path} ({type(exc).__name__}: {msg})") from None
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _timm_filter(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the architecture's timm ``checkpoint_filter_fn`` (original DeiT / Swin releases)."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    try:
        return fn(dict(sd), model)
    except Exception:  # noqa: BLE001 - a foreign checkpoint: report its keys as they are below
        return sd


def load_checkpoint(model: nn.Module, path: str, spec: ModelSpec) -> None:
    """Load ``path`` into ``model``; a one-line :class:`CheckpointError` when the keys do not fit."""
    if path.endswith(".npz"):
        if spec.family != "vit":
            raise CheckpointError(f"error: {path}: .npz (JAX) checkpoints are only for ViT models")
        model.load_pretrained(path)
        return
    sd = _timm_filter(model, read_state_dict(path))
    # Non-persistent / derived buffers timm recomputes (e.g. Swin relative_position_index).
    problem = state_dict_mismatch(model.state_dict(), sd, ("relative_position_index", "attn_mask"))
    if problem:
        raise CheckpointError(
            f"error: checkpoint {path} does not fit {spec.name} ({spec.timm_name}): {problem}; "
            f"pass weights of this architecture or choose the matching --model")
    model.load_state_dict(sd, strict=False)
