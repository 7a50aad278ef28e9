# Cascade Mask R-CNN (GIoU 4conv1f heads), Swin-B, 3x schedule, multi-scale training (480-800), AdamW.
# COCO: set data_root in ../_base_/datasets/coco_instance.py.
# Checkpoint (Swin detection release, original key layout, converted on load):
#   pretrained_weights/cascade_mask_rcnn_swin_base_patch4_window7.pth
_base_ = [
    '../_base_/models/cascade_mask_rcnn_swin_fpn.py',
    '../_base_/datasets/coco_instance_mstrain_480_800.py',
    '../_base_/schedules/schedule_3x_adamw.py',
    '../_base_/default_runtime.py'
]

model = dict(
    backbone=dict(
        embed_dims=128,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        window_size=7,
        drop_path_rate=0.3),
    neck=dict(in_channels=[128, 256, 512, 1024]))
