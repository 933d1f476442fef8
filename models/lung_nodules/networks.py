"""The bundle's network: UNets of one architecture on the same input.

Channel 0 is the nodule network (training stages 1-4), channel 1 the mass network (the
same weights fine-tuned by stages 5 and 6 on chests with a 30-80 mm mass) and, when
present, channel 2 the subsolid network (the nodule network fine-tuned by stage 7 on
chests with ground-glass and part-solid nodules labelled whole). The mass network alone
finds masses but segments some nodules in pieces; the nodule network alone never saw
anything over 30 mm and marks a mass only in part, and a part-solid nodule only by its
solid core; the subsolid network marks ground glass but also thick-slice vessel
segments. The postprocessing (:class:`models.lung_nodules.transforms.MassChanneld`)
keeps the nodule network's prediction and adds only the mass network's components
wider than a nodule can be and the subsolid network's components that measure
subsolid.

The networks keep their weights, and take their input, channels-last
(``torch.channels_last_3d``): on the CPU, oneDNN's 3-D convolutions run about 1.6 times
faster in that layout than in PyTorch's default one, for the same arithmetic
(``bench/RESULTS.md``, "The network in channels-last layout"). In eval mode each
UNet's last, full-resolution block runs at half resolution with one channel per sub-voxel
phase (:mod:`models.lung_nodules.unet_top`): the same arithmetic, a quarter less time.
"""

from __future__ import annotations

import torch

from models.lung_nodules import unet_top


class NoduleAndMassNet(torch.nn.Module):
    """``nodule``, ``mass`` and the optional ``subsolid`` network (one output channel
    each) run on the same input; their outputs are stacked as channels 0, 1 (and 2)."""

    def __init__(self, nodule: torch.nn.Module, mass: torch.nn.Module,
                 subsolid: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.nodule = nodule
        self.mass = mass
        self.subsolid = subsolid
        self.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, ...) -> (N, 2 or 3, ...): the nodule network's logits, the mass
        network's, then the subsolid network's when there is one. A 3-D input is
        taken channels-last; the output is a plain tensor of the input's dtype (under
        autocast, the networks' half-precision outputs upcast) in the default
        (contiguous) layout, each network's written straight into its channel."""
        networks = [self.nodule, self.mass] + ([self.subsolid] if self.subsolid is not None else [])
        if x.dim() != 5:
            return torch.cat([network(x) for network in networks], dim=1).contiguous()
        x = x.contiguous(memory_format=torch.channels_last_3d)
        out = torch.empty((x.shape[0], len(networks), *x.shape[2:]), dtype=x.dtype, device=x.device)
        for channel, network in enumerate(networks):  # each network's output straight into its channel
            _run(network, x, out[:, channel:channel + 1])
        return out


def _run(network: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = network(x)`` (``out``: (N, 1, D, H, W)); in eval mode, a UNet's last
    block at half resolution (:mod:`models.lung_nodules.unet_top`), written into ``out``
    as it interleaves its phases."""
    if not network.training and unet_top.foldable(network) and all(s % 2 == 0 for s in x.shape[2:]):
        unet_top.forward(network, x, out)
    else:
        out.copy_(network(x))
