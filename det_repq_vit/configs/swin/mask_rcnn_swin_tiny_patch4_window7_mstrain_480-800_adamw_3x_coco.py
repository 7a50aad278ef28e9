# Mask R-CNN, Swin-T, 3x schedule, multi-scale training (480-800), AdamW.
# COCO: set data_root in ../_base_/datasets/coco_instance.py.
# Checkpoint (Swin detection release, original key layout, converted on load):
#   pretrained_weights/mask_rcnn_swin_tiny_patch4_window7.pth
_base_ = [
    '../_base_/models/mask_rcnn_swin_fpn.py',
    '../_base_/datasets/coco_instance_mstrain_480_800.py',
    '../_base_/schedules/schedule_3x_adamw.py',
    '../_base_/default_runtime.py'
]

model = dict(
    backbone=dict(
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        drop_path_rate=0.2),
    neck=dict(in_channels=[96, 192, 384, 768]))
