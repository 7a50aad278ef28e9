"""What an adapter hands to the RepQ-ViT / QwT pipeline for one model family."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from ..config import QuantConfig, QwTConfig
from ..modules import QuantLinear
from ..quantize import LayerBits
from ..qwt import BlockInput, RunBlock, Transition


@dataclass
class QuantizedModel:
    """A model with fake-quant layers in place, plus what RepQ-ViT and QwT need to know about it.

    Attributes:
        model: the model (modified in place by the adapter).
        ln_pairs: (LayerNorm, QuantLinear) pairs to reparameterize after the first calibration pass.
        block_names: qualified names of the blocks QwT compensates, in forward order.
        first_block_input: a batch (images ``(B, 3, H, W)`` for the image adapters) → input of the
            first block (quantized model): a Tensor or a :class:`~qwt_core.qwt.BlockInput`.
        transition: glue between consecutive blocks (e.g. Swin patch merging), or None.
        run_block: how to call a block, ``(i, block, x, **block_kwargs) -> y``, or None for
            ``block(x, **block_kwargs)``.
        form: ``"token"`` (channels-last Linear compensation) or ``"conv"`` (grouped conv).
        meta: free-form description (family, bits) saved with the model.
        qwt_config: the adapter's published QwT settings (:class:`~qwt_core.QwTConfig`), used by
            :func:`qwt_core.compensate` when it is given no config.
        quant_config: the :class:`~qwt_core.QuantConfig` it was built with (set by
            :func:`qwt_core.quantize`; None for a hand-built one).
        calibrator: the adapter's own calibration ``(qm, data, ln_pairs=, row_mask=,
            integer_zero_point=) -> CalibrationReport`` used by :func:`qwt_core.calibrate`, or None
            for RepQ-ViT's one-batch protocol on ``ln_pairs``.
    """

    model: nn.Module
    ln_pairs: list[tuple[nn.Module, QuantLinear]]
    block_names: list[str]
    first_block_input: Callable[[Any], Union[torch.Tensor, BlockInput]]
    transition: Optional[Transition] = None
    run_block: Optional[RunBlock] = None
    form: Literal["token", "conv"] = "token"
    meta: dict[str, Any] = field(default_factory=dict)
    qwt_config: QwTConfig = field(default_factory=QwTConfig)
    quant_config: Optional[QuantConfig] = None
    calibrator: Optional[Callable[..., Any]] = None
    #: transitional spelling of ``qwt_config`` as keyword overrides (mirrors its non-default fields)
    qwt_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"QuantizedModel.model must be an nn.Module, not {type(self.model).__name__}")
        if not isinstance(self.qwt_config, QwTConfig):
            raise TypeError(f"QuantizedModel.qwt_config must be a QwTConfig, not {type(self.qwt_config).__name__}")
        if self.form not in ("token", "conv"):
            raise ValueError(f"QuantizedModel.form={self.form!r}: use 'token' or 'conv'")
        if self.first_block_input is not None and not callable(self.first_block_input):
            raise TypeError("QuantizedModel.first_block_input must be a callable batch -> first block input")
        if self.qwt_kwargs:
            self.qwt_config = self.qwt_config.replace(**self.qwt_kwargs)
        self._mirror()

    def _mirror(self) -> None:
        default = QwTConfig()
        self.qwt_kwargs = {k: v for k, v in self.qwt_config.to_dict().items()
                           if k != "config" and getattr(default, k, None) != getattr(self.qwt_config, k)}


def transformer_layer_rule(w_bits: int, a_bits: int, eight_bit: tuple[str, ...],
                           channel_wise_suffixes: tuple[str, ...]):
    """Bit rule shared by the ViT-style adapters.

    Layers whose name starts with one of ``eight_bit`` (patch embedding, heads) get W8/A8; layers whose
    name ends with one of ``channel_wise_suffixes`` (inputs coming from a LayerNorm) get a channel-wise
    input quantizer (reparameterized later); every other Linear/Conv2d gets ``w_bits/a_bits``.
    """

    def rule(name: str, module: nn.Module) -> Optional[LayerBits]:
        if any(name == p or name.startswith(p + ".") for p in eight_bit):
            return LayerBits(8, 8)
        if isinstance(module, nn.Linear) and name.endswith(channel_wise_suffixes):
            return LayerBits(w_bits, a_bits, act_channel_wise=True)
        return LayerBits(w_bits, a_bits)

    return rule
