"""torchvision ResNet-50 FPN Mask R-CNN: COCO evaluation, Percentile PTQ + QwT (no mmcv needed).

Task glue only: the quantization recipe is ``qwt_core.adapters.timm_resnet`` (via
``qwt_core.adapters.torchvision_rcnn``), QwT is ``qwt_core.compensate``. See docs/maskrcnn_torchvision.md.
"""
