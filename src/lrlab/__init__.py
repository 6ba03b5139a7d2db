"""lrlab: the learning-rate workflow for image classifiers in PyTorch.

LR range test -> optimizer + schedule -> training curves -> mistakes and Grad-CAM -> report.
"""

__version__ = "0.1.0"
