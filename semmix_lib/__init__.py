"""semmix: a reproducible study and library for CSM (Luo et al., 2025).

"Beyond One-Hot Labels: Semantic Mixing for Model Calibration" generates images that mix two
classes with a class-conditional diffusion model, re-annotates how much of each class they show
with CLIP, and trains classifiers on them with soft labels. See the README for the stages.
"""

__version__ = "0.1.0"
