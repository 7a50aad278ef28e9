"""CLIP zero-shot ImageNet with RepQ-ViT + QwT (open_clip); entry point ``mm_clip/main.py``."""
