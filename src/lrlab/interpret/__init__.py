"""Study a trained classifier: predictions, the mistakes, confusion, class activation maps and
whether those maps point at what the model uses.

- :mod:`lrlab.interpret.predictions`: :class:`Predictions`, :func:`predict`, the mistakes in a
  registered order (:data:`SELECT_BY`), :func:`confusion_matrix`, :func:`per_class_summary`.
- :mod:`lrlab.interpret.cam`: the CAM methods (:data:`CAM_METHODS`, pytorch-grad-cam;
  Grad-CAM++ and Score-CAM in :mod:`lrlab.interpret.cam_methods`), :func:`class_activation_maps`, :func:`layer_names`,
  :func:`target_layers`, :func:`denormalize`.
- :mod:`lrlab.interpret.faithfulness`: the keep / delete test of the CAM methods
  (:func:`cam_faithfulness`, :class:`FaithfulnessResult`).

Import from here: ``from lrlab.interpret import predict, class_activation_maps, cam_faithfulness``.

Example::

    compute = Compute.choose()
    pred = predict(model, test_loader, compute)
    wrong = select_misclassified(pred, k=25)                 # highest-loss mistakes first
    images = torch.stack([test_set[i][0] for i in wrong])    # (25, 3, 32, 32) normalised
    maps = class_activation_maps(model, images, pred.preds[wrong], target_layer="layer4")
    result = cam_faithfulness(model, images, compute, target_layer="layer4")
"""

from lrlab.interpret.cam import (
    CAM_METHODS,
    DEFAULT_CAM_METHOD,
    class_activation_maps,
    denormalize,
    layer_names,
    target_layers,
)
from lrlab.interpret.faithfulness import (
    FRACTIONS,
    FaithfulnessResult,
    cam_faithfulness,
    format_table,
    keep_masks,
    random_maps,
    table_rows,
)
from lrlab.interpret.predictions import (
    SELECT_BY,
    Predictions,
    confusion_matrix,
    per_class_summary,
    predict,
    select_misclassified,
)

__all__ = [
    "CAM_METHODS",
    "DEFAULT_CAM_METHOD",
    "FRACTIONS",
    "SELECT_BY",
    "FaithfulnessResult",
    "Predictions",
    "cam_faithfulness",
    "class_activation_maps",
    "confusion_matrix",
    "denormalize",
    "format_table",
    "keep_masks",
    "layer_names",
    "per_class_summary",
    "predict",
    "random_maps",
    "select_misclassified",
    "table_rows",
    "target_layers",
]
