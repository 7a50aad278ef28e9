"""PTQ + QwT for Ultralytics YOLO11 / YOLOv8 / YOLOv5u and the original (anchor-based) YOLOv5.

Task glue only: the quantizers, the calibration and the closed-form compensation come from
``qwt_core``; this folder loads the detector, walks its layer graph, feeds images and runs the
Ultralytics validator. Ultralytics (AGPL-3.0) is imported lazily and only from here.

    from yolo_qwt.models import load_detector
    from yolo_qwt.quant import YoloQuantConfig, quantize_yolo, calibrate_yolo, compensate_yolo
    from yolo_qwt.evaluate import validate

    det = load_detector("yolo11s.pt")
    qy = quantize_yolo(det, YoloQuantConfig(w_bits=4, a_bits=8))
    calibrate_yolo(qy, images[:32])
    report = compensate_yolo(qy, images.split(16))
    metrics = validate(det, "coco.yaml", imgsz=640)      # {"map50_95": ..., "map50": ...}
"""
import os

# local checkpoints only: Ultralytics must not try to reach the network (fonts, hub, AMP checks)
os.environ.setdefault("YOLO_OFFLINE", "1")
