"""Argmax on the device: a multi-label bundle's prediction never reaches the CPU whole.

A segmentation bundle such as the Model Zoo's ``wholeBody_ct_segmentation`` (105
channels) starts its postprocessing with ``Activationsd(softmax=True)`` and
``AsDiscreted(argmax=True)`` on ``pred``. Run as written, the inferer's float
prediction (105 x the preprocessed grid: about 6 GB at 1.5 mm for a 512 x 512 x 300
chest CT) is copied to the CPU and softmaxed into a second array of the same size
before the argmax keeps one channel.

Softmax is monotonic, so ``argmax(softmax(x)) == argmax(x)`` exactly. When the
postprocessing begins with exactly these two transforms on the prediction key (and
nothing else set on them), :func:`fuse_argmax` removes them from the composition and the
plugin takes the argmax of the inferer's output where it lies (the GPU, when the model
runs there), copying only a one-channel label map to the host. Everything after them
(``Invertd`` to the source grid, etc.) runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms.post.dictionary import Activationsd, AsDiscreted


def _only_softmax(transform: Any, key: str) -> bool:
    return (
        isinstance(transform, Activationsd)
        and tuple(transform.keys) == (key,)
        and tuple(transform.softmax) == (True,)
        and not any(transform.sigmoid)
        and all(other is None for other in transform.other)
        and not getattr(transform.converter, "kwargs", None)
    )


def _only_argmax(transform: Any, key: str) -> bool:
    return (
        isinstance(transform, AsDiscreted)
        and tuple(transform.keys) == (key,)
        and tuple(transform.argmax) == (True,)
        and all(v is None for v in transform.to_onehot)
        and all(v is None for v in transform.threshold)
        and all(v is None for v in transform.rounding)
        and not getattr(transform.converter, "kwargs", None)  # dim, keepdim, dtype: as given
    )


def fuse_argmax(postprocessing: Any, key: str = "pred") -> bool:
    """Drop a leading ``Activationsd(softmax)`` + ``AsDiscreted(argmax)`` on ``key`` from
    ``postprocessing`` (a MONAI ``Compose``); True when they were dropped, and the
    caller must then give the postprocessing the argmax of the prediction instead."""
    items = getattr(postprocessing, "transforms", None)
    if not isinstance(items, (list, tuple)) or len(items) < 2:
        return False
    if not (_only_softmax(items[0], key) and _only_argmax(items[1], key)):
        return False
    postprocessing.transforms = tuple(items[2:])
    return True


def argmax_channels(prediction: torch.Tensor) -> torch.Tensor:
    """``(B, C, ...)`` -> ``(B, 1, ...)`` class indices as float (``AsDiscrete``'s dtype),
    computed on the prediction's own device."""
    return torch.argmax(prediction, dim=1, keepdim=True).to(torch.float32)
