"""Model registry: ``build_model(name, num_classes, **kwargs)``.

Adding a model is adding one function decorated with ``@register``; each model class
sets ``default_cam_layer``, the name of a module whose output has 8x8 maps for 32x32
inputs, used by Grad-CAM when the recipe does not name one.
"""

from lrlab.models.registry import build_model, model_names, register
from lrlab.models import fastnet as _fastnet  # noqa: F401  (registers)
from lrlab.models import resnet as _resnet  # noqa: F401  (registers)

__all__ = ["build_model", "model_names", "register"]
