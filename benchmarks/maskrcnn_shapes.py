"""torchvision ResNet-50 FPN Mask R-CNN on the shapes set: train, then FP / PTQ / + QwT box and mask AP.

    python benchmarks/maskrcnn_shapes.py                      # results/maskrcnn_shapes.{json,png}

1. Writes a COCO-layout shapes set (``benchmarks/shapes.py``: train2017 for training and real
   calibration, val2017 for AP) and trains a ``maskrcnn_resnet50_fpn`` (v1 layout; ResNet-50 trunk
   with BatchNorm, every stage trainable, small RoI heads: TwoMLPHead 256, mask head 2 x 64 convs —
   the heads stay full precision in the paper's layer set) from random initialisation at
   ``--size`` px. The checkpoint is reused when its configuration matches (``--retrain`` forces).
2. Loads it back as torchvision's trained-model layout (``FrozenBatchNorm2d`` trunk) through
   ``det_torchvision.model.load_maskrcnn`` and evaluates it with pycocotools.
3. For W8A8 / W4A8 / W4A4: the Percentile recipe on the paper's layer set calibrated on 32 real
   train images; + QwT on the trunk with the published in-sample gate and with the held-out gate
   (``--calib-size`` real images); + QwT on the trunk and the FPN output convs (in-sample gate).
4. Data-free rows (unless ``--no-synthetic``): ``--synth-images`` images synthesized from the FP
   detector alone (``det_torchvision.synth``: DFQ's ResNet objective and optimiser, labels of the
   train annotations, ``--synth-iters`` Adam steps instead of DFQ's 300 to fit a CPU run), then the
   Percentile calibration and QwT on them; the control row uses the same number of real images.

Deterministic for a given ``--threads`` (seeded data, initialisation, batches and flips).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from shapes import CLASSES, make_shapes, write_coco_dataset  # noqa: E402

SETTINGS = ((8, 8), (4, 8), (4, 4))
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile", "fma", "sse4_2")


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model and flags, core count, torch threads and versions."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if flags and name:
                    break
    except OSError:
        pass
    import torchvision

    return {"cpu": name, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cpu_count": os.cpu_count(),
            "torch_threads": threads, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def model_kwargs(size: int) -> dict[str, Any]:
    """The benchmark detector's ``MaskRCNN`` options (stored in the checkpoint)."""
    return {"min_size": size, "max_size": size, "box_head_dim": 256, "mask_head_layers": [64, 64],
            "anchor_sizes": [16, 32, 64, 128, 256],
            "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
            "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150,
            "box_batch_size_per_image": 64, "box_detections_per_img": 30}


def _targets(images, flips: list[bool]):
    out, imgs = [], []
    for im, flip in zip(images, flips):
        x = torch.from_numpy(im.image).permute(2, 0, 1).float() / 255.0
        boxes = torch.from_numpy(im.boxes).clone()
        masks = torch.from_numpy(im.masks).to(torch.uint8)
        if flip:
            w = x.shape[-1]
            x, masks = x.flip(-1), masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        imgs.append(x)
        out.append({"boxes": boxes, "labels": torch.from_numpy(im.labels) + 1, "masks": masks})
    return imgs, out


def train(args: argparse.Namespace, ckpt: str) -> dict[str, Any]:
    """Train the detector from random initialisation; returns the loss history."""
    from det_torchvision.model import build_maskrcnn, save_maskrcnn

    torch.manual_seed(args.seed)
    kw = model_kwargs(args.size)
    model = build_maskrcnn(num_classes=len(CLASSES) + 1, frozen_bn=False, trainable_layers=5, **kw)
    data = make_shapes(args.train_images, args.size, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    warm = min(50, args.iters // 5)

    def lr_at(it: int) -> float:
        if it < warm:
            return args.lr * (0.001 + 0.999 * it / warm)
        return args.lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, args.iters - warm)))

    g = torch.Generator().manual_seed(args.seed)
    model.train()
    history, t0, order = [], time.perf_counter(), torch.randperm(len(data), generator=g).tolist()
    from tqdm.auto import tqdm

    bar = tqdm(range(args.iters), desc="train")
    pos = 0
    for it in bar:
        if pos + args.batch > len(order):
            order, pos = torch.randperm(len(data), generator=g).tolist(), 0
        idx, pos = order[pos:pos + args.batch], pos + args.batch
        flips = (torch.rand(len(idx), generator=g) < 0.5).tolist()
        imgs, tgts = _targets([data[i] for i in idx], flips)
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        losses = model(imgs, tgts)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        if it % 10 == 0 or it == args.iters - 1:
            history.append({"iter": it, "loss": float(loss), **{k: float(v) for k, v in losses.items()}})
            bar.set_postfix(loss=f"{float(loss):.3f}")
    save_maskrcnn(model.eval(), ckpt, model_kwargs=kw)
    return {"seconds": time.perf_counter() - t0, "history": history}


#: rows of the figure (every row is in the JSON): key in ``settings[...]["ap"]`` -> legend label
PLOT_METHODS = {"ptq": "PTQ", "qwt": "+QwT", "qwt_holdout": "+QwT held-out", "qwt_synth": "+QwT synthetic",
                "zsqat": "ZS-QAT"}


def write_png(summary: dict[str, Any], png: str) -> str:
    """Box AP bars per bit width (FP, PTQ, + QwT with both gates, + QwT on synthetic images, zero-shot
    QAT) from the summary written as JSON."""
    from qwt_core.plotting import plot_accuracy

    rows = [{"setting": "FP32", "method": "FP", "top1": summary["fp"]["ap"]["bbox"]}]
    for name, entry in summary["settings"].items():
        for k, label in PLOT_METHODS.items():
            if k in entry["ap"]:
                rows.append({"setting": name, "method": label, "top1": entry["ap"][k]["bbox"]})
    size = summary["config"]["size"]
    return plot_accuracy(rows, png, f"Mask R-CNN R50-FPN on shapes ({size} px), paper layer set",
                         ylabel="box AP (%)")


def config_key(args: argparse.Namespace) -> str:
    cfg = {k: getattr(args, k) for k in ("size", "train_images", "iters", "batch", "lr", "seed", "threads")}
    return hashlib.sha1(json.dumps({**cfg, **model_kwargs(args.size)}, sort_keys=True).encode()).hexdigest()[:12]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="image size (px), train and test")
    p.add_argument("--train-images", type=int, default=1024)
    p.add_argument("--val-images", type=int, default=128)
    p.add_argument("--iters", type=int, default=600, help="training iterations")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--calib-batch", type=int, default=32, help="Percentile calibration images")
    p.add_argument("--calib-size", type=int, default=256, help="QwT calibration images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default=str(ROOT / "work_dirs" / "maskrcnn_shapes"))
    p.add_argument("--output", default=str(ROOT / "results" / "maskrcnn_shapes.json"))
    p.add_argument("--retrain", action="store_true", help="train even if a matching checkpoint exists")
    p.add_argument("--no-synthetic", dest="synthetic", action="store_false", help="skip the data-free rows")
    p.add_argument("--synth-images", type=int, default=32, help="synthetic calibration images")
    p.add_argument("--synth-iters", type=int, default=50, help="Adam steps per synthesis batch (DFQ: 300)")
    p.add_argument("--synth-batch", type=int, default=8, help="images per synthesis batch")
    p.add_argument("--zsqat-epochs", type=int, default=2, help="zero-shot QAT epochs on the synthetic set (0: skip)")
    p.add_argument("--zsqat-batch", type=int, default=4, help="zero-shot QAT batch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from det_torchvision import ptq
    from det_torchvision.data import CocoImages, calibration_batches, list_calibration_images
    from det_torchvision.evaluate import ap_percent, evaluate_coco
    from det_torchvision.model import load_maskrcnn
    work = Path(args.work_dir)
    coco = work / "coco"
    key = config_key(args)
    ckpt = str(work / f"maskrcnn_shapes_{key}.pth")
    marker = coco / "done.json"
    data_cfg = {"train": args.train_images, "val": args.val_images, "size": args.size}
    if not marker.is_file() or json.loads(marker.read_text()) != data_cfg:
        write_coco_dataset(str(coco), "train2017", n=args.train_images, size=args.size, seed=0)
        write_coco_dataset(str(coco), "val2017", n=args.val_images, size=args.size, seed=1)
        marker.write_text(json.dumps(data_cfg))
    training: dict[str, Any] = {"reused": True}
    if args.retrain or not Path(ckpt).is_file():
        training = {"reused": False, **train(args, ckpt)}
        (work / f"train_{key}.json").write_text(json.dumps(training))
    elif (work / f"train_{key}.json").is_file():
        training = {**json.loads((work / f"train_{key}.json").read_text()), "reused": True}

    val = CocoImages(str(coco), "val2017")
    fp, info = load_maskrcnn(ckpt)
    t0 = time.perf_counter()
    fp_metrics = evaluate_coco(fp, val, "cpu", desc="fp")
    seconds: dict[str, float] = {"eval_fp": time.perf_counter() - t0}
    paths = list_calibration_images(str(coco), "train2017", max(args.calib_size, args.calib_batch), args.seed)
    calib = next(calibration_batches(paths[:args.calib_batch], args.calib_batch, args.size))
    qwt_batches = list(calibration_batches(paths[:args.calib_size], 32, args.size))

    synth_info: dict[str, Any] = {}
    if args.synthetic:
        from det_torchvision.synth import coco_labels, dfq_resnet_config, synthesize, synthetic_images

        sdir = str(work / f"synth_{key}_n{args.synth_images}_it{args.synth_iters}")
        labels = coco_labels(str(coco), "train2017", args.size, seed=args.seed, max_images=args.synth_images)
        t0 = time.perf_counter()
        cfg = dfq_resnet_config(iterations=args.synth_iters)
        man = synthesize(fp, labels, sdir, args.size, cfg, args.synth_batch, seed=args.seed, checkpoint=ckpt,
                         arch=info["arch"])
        seconds["synthesis"] = time.perf_counter() - t0
        synth_imgs = synthetic_images(sdir, checkpoint=ckpt)
        synth_info = {"images": int(synth_imgs.shape[0]), "config": cfg.to_dict(), "label_source": "coco",
                      "batch": args.synth_batch, "folder": sdir, "complete": man.complete}
        real_small = list(calibration_batches(paths[:args.synth_images], 32, args.size))

    settings: dict[str, Any] = {}
    for w, a in SETTINGS:
        name = f"W{w}A{a}"
        entry: dict[str, Any] = {"metrics": {}, "ap": {}, "qwt_reports": {}}

        def calibrated():
            """A fresh quantized copy of the FP detector, calibrated (deterministic: same batch)."""
            qm = ptq.quantize_detector(copy.deepcopy(fp), w, a)
            ptq.calibrate_detector(qm, calib)
            return qm

        t0 = time.perf_counter()
        qm = calibrated()
        seconds[f"{name}_calibration"] = time.perf_counter() - t0
        entry["metrics"]["ptq"] = evaluate_coco(qm.model, val, "cpu", desc=f"{name} ptq")
        variants = (("qwt", {}, False), ("qwt_holdout", {"gate": "holdout"}, False),
                    ("qwt_fpn", {}, True))
        for label, kwargs, fpn in variants:
            qv = qm if label == "qwt" else calibrated()
            t0 = time.perf_counter()
            rep = ptq.compensate_detector(qv, qwt_batches, fpn=fpn, progress=False, **kwargs)
            seconds[f"{name}_{label}"] = time.perf_counter() - t0
            entry["qwt_reports"][label] = rep
            entry["metrics"][label] = evaluate_coco(qv.model, val, "cpu", desc=f"{name} {label}")
        if args.synthetic:
            n = args.synth_images
            for label, calib_src, qwt_src in (("ptq_synth", synth_imgs[:args.calib_batch], list(synth_imgs.split(32))),
                                              ("ptq_real_small", calib, real_small)):
                qm_s = ptq.quantize_detector(copy.deepcopy(fp), w, a)
                ptq.calibrate_detector(qm_s, calib_src)
                entry["metrics"][label] = evaluate_coco(qm_s.model, val, "cpu", desc=f"{name} {label}")
                qlabel = label.replace("ptq", "qwt")
                entry["qwt_reports"][qlabel] = ptq.compensate_detector(qm_s, qwt_src, progress=False)
                entry["metrics"][qlabel] = evaluate_coco(qm_s.model, val, "cpu", desc=f"{name} {qlabel}")
            entry["synthetic_images"] = n
            if args.zsqat_epochs > 0:
                from det_torchvision import zsqat
                from qwt_core.synth_io import load_synthetic_set

                cfg_z = zsqat.ZsqatConfig(w_bits=w, a_bits=a, epochs=args.zsqat_epochs, batch_size=args.zsqat_batch,
                                          seed=args.seed)
                student = copy.deepcopy(fp)
                zsqat.quantize_lsq(student, w, a)
                t0 = time.perf_counter()
                hist = zsqat.train(student, copy.deepcopy(fp), zsqat.SyntheticBatches(load_synthetic_set(sdir)),
                                   cfg_z, str(work / f"zsqat_{key}_{name}"), progress=False)
                seconds[f"{name}_zsqat"] = time.perf_counter() - t0
                for f in (work / f"zsqat_{key}_{name}").glob("epoch_*.pth"):
                    f.unlink()  # a fresh run each time
                entry["zsqat"] = {"config": {**cfg_z.__dict__, "milestones": list(cfg_z.milestones)},
                                  "first": hist[0], "last": hist[-1], "iterations": len(hist)}
                entry["metrics"]["zsqat"] = evaluate_coco(student, val, "cpu", desc=f"{name} zsqat")
        entry["ap"] = {k: ap_percent(v) for k, v in entry["metrics"].items()}
        settings[name] = entry
        print(name, json.dumps(entry["ap"]))
    fp_ap = ap_percent(fp_metrics)
    out = Path(args.output)
    png = str(out.with_suffix(".png"))
    summary = {
        "benchmark": "maskrcnn_shapes", "machine": machine_info(args.threads),
        "config": {**vars(args), "model_kwargs": info["model_kwargs"], "arch": info["arch"],
                   "num_classes": info["num_classes"], "layer_set": "paper", "act_mode": "true",
                   "recipe": "published", "checkpoint_key": key,
                   "calibration": "real train2017 images of the shapes set"},
        "training": {k: v for k, v in training.items() if k != "history"},
        "training_loss": [h for h in training.get("history", [])][-5:],
        "fp": {"metrics": fp_metrics, "ap": fp_ap},
        "synthetic": synth_info, "settings": settings, "seconds": seconds, "plot": png,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    write_png(summary, png)
    print(f"FP {fp_ap}; results written to {out} and {png}")
    return summary


if __name__ == "__main__":
    main()
