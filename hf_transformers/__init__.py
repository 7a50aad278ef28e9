"""Hugging Face transformers text models: RepQ-ViT-style PTQ + QwT from the command line.

``python -m hf_transformers.main --model PATH --calib-text FILE --eval-text FILE --w_bits 4 --a_bits 4``
(see :mod:`hf_transformers.main`). The algorithm lives in :mod:`qwt_core`; the adapter in
:mod:`qwt_core.adapters.hf`.
"""
