"""The bundle's network: two UNets of one architecture on the same input.

Channel 0 is the nodule network (training stages 1-4), channel 1 the mass network (the
same weights fine-tuned by stages 5 and 6 on chests with a 30-80 mm mass). The mass
network alone finds masses but segments some nodules in pieces; the nodule network
alone never saw anything over 30 mm and marks a mass only in part. The postprocessing
(:class:`models.lung_nodules.transforms.MassChanneld`) keeps the nodule network's
prediction and adds only the mass network's components wider than a nodule can be.
"""

from __future__ import annotations

import torch


class NoduleAndMassNet(torch.nn.Module):
    """``nodule`` and ``mass`` (one output channel each) run on the same input; their
    outputs are stacked as channels 0 and 1."""

    def __init__(self, nodule: torch.nn.Module, mass: torch.nn.Module) -> None:
        super().__init__()
        self.nodule = nodule
        self.mass = mass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, ...) -> (N, 2, ...): the nodule network's logits, then the mass network's."""
        return torch.cat([self.nodule(x), self.mass(x)], dim=1)
