from setuptools import find_packages, setup

setup(
    name="qwt-toolkit",
    version="0.1.0",
    description="QwT (Quantization without Tears) compensation on top of RepQ-ViT post-training quantization",
    packages=find_packages(include=["qwt_core", "qwt_core.*", "cls_repq_vit", "cls_repq_vit.*",
                                    "mm_clip", "mm_clip.*", "det_repq_vit", "det_repq_vit.*",
                                    "hf_transformers", "hf_transformers.*",
                                    "yolo_qwt", "yolo_qwt.*"]),
    package_data={"mm_clip": ["*.txt", "*.json"], "det_repq_vit": ["configs/**/*.py"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "torchvision>=0.16", "timm>=1.0,<2", "numpy", "tqdm"],
    extras_require={
        "cls": [],
        "clip": ["open_clip_torch>=2.24", "webdataset>=0.2.86", "braceexpand", "ftfy", "regex"],
        "det": ["mmengine==0.10.7", "mmcv==2.1.0", "mmdet==3.3.0", "pycocotools"],
        "hf": ["transformers>=4.45,<6"],
        # AGPL-3.0; the original YOLOv5 code: `pip install --no-deps yolov5==7.0.14` (make yolo)
        "yolo": ["ultralytics>=8.4,<8.5", "pandas", "seaborn", "setuptools<81"],
        "deploy": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.5"],
        "demo": ["matplotlib", "scikit-learn"],
        "test": ["pytest", "scikit-learn", "matplotlib"],
    },
)
