"""Tiny random-init models of the real timm architectures, shared by the core tests."""
import timm
import torch
from torch import nn


def tiny_vit(distilled: bool = False) -> nn.Module:
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_small_patch16_224"
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=10).eval()


def tiny_swin() -> nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56,
                             embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()


def tiny_resnet() -> nn.Module:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    # timm zero-initialises the last BN of each block; give all BNs non-trivial statistics.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_mean = 0.1 * torch.randn(m.num_features, generator=g)
            m.running_var = 0.5 + torch.rand(m.num_features, generator=g)
    return model


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)
