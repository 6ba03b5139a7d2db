"""Models: ``build(name, classes, weights, **kwargs)`` and what lrlab needs to know about a
model, :class:`ModelSpec` (``model_spec(model)``).

``name`` is one of lrlab's own CIFAR networks (``model_names()``; adding one is adding a function
decorated with ``@register`` in this package, with a ``default_cam_layer`` whose output has 8x8
maps for 32x32 inputs), ``torchvision:<name>``, ``timm:<name>`` or ``package.module:function``;
``weights`` is None (random initialisation), a pretrained weights name or a state-dict file (see
:mod:`lrlab.models.external` and :mod:`lrlab.models.weights`).
"""

from lrlab.models.registry import model_names, register
from lrlab.models import fastnet, resnet  # importing registers them

del fastnet, resnet
from lrlab.models.external import build, check_name
from lrlab.models.spec import ModelSpec, model_spec

__all__ = ["ModelSpec", "build", "check_name", "model_names", "model_spec", "register"]
