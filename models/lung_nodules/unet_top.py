"""The last, full-resolution block of MONAI's UNet, computed at half resolution.

The bundle's UNets (``num_res_units=1``, one output channel) end in a block that works
on the full-resolution grid with a single channel: a stride-2 transposed convolution
(16 -> 1 channels), BatchNorm and PReLU, then a residual unit's 3 x 3 x 3 convolution
(1 -> 1) plus its input. oneDNN is slow at one channel: on the CPU this block is
about 40 % of the UNet's time.

The same arithmetic can run on the half-resolution grid with eight channels, one per
sub-voxel phase ``(pd, ph, pw)`` of the output (output voxel ``2 m + p`` along each
axis):

* the transposed convolution is an ordinary 2 x 2 x 2 convolution whose output channel
  ``p`` holds phase ``p``: along an axis, phase 0 takes input ``m`` through tap 1,
  phase 1 takes input ``m`` through tap 2 and ``m + 1`` through tap 0;
* BatchNorm and PReLU act per voxel with one channel's parameters, so on all eight
  phase channels alike;
* the 3 x 3 x 3 convolution becomes an 8 -> 8 one: output phase ``p`` at ``m`` reads
  full-resolution offset ``d`` from phase ``q = (p + d) mod 2`` at ``m + (p + d - q) / 2``;
* the phases are then interleaved into the full grid (a 3-D pixel shuffle).

Run with ``padding=1``, the 2 x 2 x 2 convolution yields one extra plane at the start
of each axis (phase grid index ``m + 1``); that plane is set to zero, which is exactly
the zero padding the 3 x 3 x 3 convolution sees below the grid's start, and is cut off
before the shuffle. Same sums in another order: the logits agree to about 1e-5
(``tests/test_lung_nodule_transforms.py``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution, ResidualUnit

ZERO_TAP = 3  # index of the zero appended to each kernel axis

# Along one axis: the transposed convolution's tap for (output phase, input offset j)
# of the 2-tap convolution (inputs m and m + 1), ZERO_TAP where none.
_TRANSPOSED_TAP = ((1, ZERO_TAP), (2, 0))


def _conv_tap(p: int, q: int, e: int) -> int:
    """Along one axis: the 3-tap convolution's tap feeding output phase ``p`` from input
    phase ``q`` at half-resolution offset ``e - 1``, ZERO_TAP where none."""
    d = 2 * (e - 1) + q - p
    return d + 1 if -1 <= d <= 1 else ZERO_TAP


_PHASES = list(itertools.product((0, 1), repeat=3))
_TRANSPOSED_INDEX = tuple(
    torch.tensor([[[[_TRANSPOSED_TAP[p[axis]][(a, b, c)[axis]] for c in (0, 1)] for b in (0, 1)]
                   for a in (0, 1)] for p in _PHASES])
    for axis in range(3)
)  # three (8, 2, 2, 2) index tensors
_CONV_INDEX = tuple(
    torch.tensor([[[[[_conv_tap(p[axis], q[axis], (a, b, c)[axis]) for c in range(3)]
                     for b in range(3)] for a in range(3)] for q in _PHASES] for p in _PHASES])
    for axis in range(3)
)  # three (8, 8, 3, 3, 3) index tensors


def foldable(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` is a MONAI UNet ending in the block this module computes (a
    stride-2, 3 x 3 x 3 transposed convolution to one channel, BatchNorm, dropout and
    PReLU in that order, then a residual unit of one 3 x 3 x 3 convolution)."""
    model = getattr(unet, "model", None)
    if not isinstance(model, torch.nn.Sequential) or len(model) != 3:
        return False
    top = model[2]
    if not isinstance(top, torch.nn.Sequential) or len(top) != 2:
        return False
    up, residual = top
    if not isinstance(up, Convolution) or not isinstance(residual, ResidualUnit):
        return False
    conv_t, adn = getattr(up, "conv", None), getattr(up, "adn", None)
    if not (isinstance(conv_t, torch.nn.ConvTranspose3d) and conv_t.out_channels == 1
            and conv_t.kernel_size == (3, 3, 3) and conv_t.stride == (2, 2, 2)
            and conv_t.padding == (1, 1, 1) and conv_t.output_padding == (1, 1, 1)
            and conv_t.dilation == (1, 1, 1) and conv_t.groups == 1):
        return False
    if not isinstance(adn, ADN) or [name for name, _ in adn.named_children()] != ["N", "D", "A"]:
        return False
    if not (isinstance(adn.N, torch.nn.BatchNorm3d) and adn.N.num_features == 1
            and adn.N.track_running_stats and isinstance(adn.A, torch.nn.PReLU)
            and adn.A.num_parameters == 1):
        return False
    units = list(residual.conv.children())
    if len(units) != 1 or not isinstance(residual.residual, torch.nn.Identity):
        return False
    unit = units[0]
    conv = getattr(unit, "conv", None)
    return (isinstance(unit, Convolution) and len(list(unit.children())) == 1
            and isinstance(conv, torch.nn.Conv3d) and conv.in_channels == conv.out_channels == 1
            and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
            and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1)


def _bias(layer: torch.nn.Conv3d | torch.nn.ConvTranspose3d) -> torch.Tensor:
    return layer.bias if layer.bias is not None else layer.weight.new_zeros(1)


def _per_phase(values: torch.Tensor) -> torch.Tensor:
    """A one-channel parameter for all eight phase channels."""
    return values.expand(8).contiguous()


def forward(unet: torch.nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``unet(x)`` for a :func:`foldable` UNet in eval mode, its last block at half
    resolution (module doc); ``x`` is (N, C, D, H, W). With ``out`` (N, 1, D, H, W) the
    result is written there (the phases interleaved straight into it) and returned."""
    model: Any = unet.model
    h = model[1](model[0](x))
    up, residual = model[2]
    conv_t: torch.nn.ConvTranspose3d = up.conv
    bn: torch.nn.BatchNorm3d = up.adn.N
    prelu: torch.nn.PReLU = up.adn.A
    conv: torch.nn.Conv3d = residual.conv[0].conv
    layout = torch.channels_last_3d if h.is_contiguous(memory_format=torch.channels_last_3d) \
        else torch.contiguous_format

    taps = F.pad(conv_t.weight[:, 0], (0, 1, 0, 1, 0, 1))  # (C, 4, 4, 4), index 3 is zero
    w_up = taps[:, _TRANSPOSED_INDEX[0], _TRANSPOSED_INDEX[1], _TRANSPOSED_INDEX[2]].transpose(0, 1)
    a = F.conv3d(h, w_up.contiguous(memory_format=layout), _per_phase(_bias(conv_t)), padding=1)
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None  # foldable() checked track_running_stats
    a = F.batch_norm(a, _per_phase(mean), _per_phase(var),
                     _per_phase(bn.weight) if bn.weight is not None else None,
                     _per_phase(bn.bias) if bn.bias is not None else None, False, 0.0, bn.eps)
    a = F.prelu(a, prelu.weight)
    a[:, :, 0].zero_()  # the plane before the grid: the 3 x 3 x 3 convolution's zero padding
    a[:, :, :, 0].zero_()
    a[:, :, :, :, 0].zero_()
    kernel = F.pad(conv.weight[0, 0], (0, 1, 0, 1, 0, 1))  # (4, 4, 4), index 3 is zero
    w_res = kernel[_CONV_INDEX[0], _CONV_INDEX[1], _CONV_INDEX[2]]
    y = a + F.conv3d(a, w_res.contiguous(memory_format=layout), _per_phase(_bias(conv)), padding=1)
    y = y[:, :, 1:, 1:, 1:]
    n, _, d, hh, w = y.shape
    shuffled = y.reshape(n, 2, 2, 2, d, hh, w).permute(0, 4, 1, 5, 2, 6, 3)
    if out is None:
        return shuffled.reshape(n, 1, 2 * d, 2 * hh, 2 * w)
    out.view(n, d, 2, hh, 2, w, 2).copy_(shuffled)
    return out
