"""Hugging Face encoders with early exits on real data (``python -m adaexit encoders``).

* :mod:`.debian`: Debian package descriptions labelled with their archive section, from apt's lists;
* :mod:`.job`: the job (frozen MiniLM on that text task; a small ViT on Fashion-MNIST).
"""
