"""The bundle's network (models/lung_nodules/networks.py, unet_top.py): its channels,
its memory layout, and each UNet's last block computed at half resolution."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from models.lung_nodules import unet_top
from models.lung_nodules.networks import NoduleAndMassNet


def test_network_stacks_a_third_channel_only_when_it_has_a_subsolid_network() -> None:
    def one() -> torch.nn.Module:
        return torch.nn.Conv3d(1, 1, 1)

    x = torch.zeros(1, 1, 4, 4, 4)
    assert NoduleAndMassNet(one(), one())(x).shape[1] == 2
    assert NoduleAndMassNet(one(), one(), one())(x).shape[1] == 3


def test_network_runs_channels_last_and_gives_the_default_layouts_output() -> None:
    """The weights stay channels-last after loading a state dict (the layout oneDNN's
    3-D convolutions are fastest in), and the output is the one the same UNets give in
    PyTorch's default layout."""

    def unet() -> torch.nn.Module:
        torch.manual_seed(0)
        return UNet(3, 1, 1, (4, 8), (2,), num_res_units=1, norm="batch").eval()

    net = NoduleAndMassNet(unet(), unet(), unet()).eval()
    net.load_state_dict(NoduleAndMassNet(unet(), unet(), unet()).state_dict())
    weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    x = torch.rand(1, 1, 16, 24, 8)
    with torch.inference_mode():
        out = net(x)
        plain = torch.cat([unet()(x)] * 3, dim=1)
    assert out.is_contiguous() and out.shape == (1, 3, 16, 24, 8)
    assert torch.allclose(out, plain, atol=1e-5)


def test_unet_last_block_at_half_resolution_gives_the_unets_output() -> None:
    """The bundle's UNet architecture, random weights and BatchNorm statistics: its last
    block computed per sub-voxel phase at half resolution gives the UNet's own logits,
    in both memory layouts; a UNet ending otherwise is not folded."""
    torch.manual_seed(1)
    unet = UNet(3, 1, 1, (8, 16, 32), (2, 2), num_res_units=1, norm="batch")
    for module in unet.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
        if isinstance(module, torch.nn.PReLU):
            module.weight.data.fill_(0.1)
    unet.eval()
    assert unet_top.foldable(unet)
    with torch.inference_mode():
        for shape in ((16, 24, 8), (32, 8, 40)):
            x = torch.randn(2, 1, *shape)
            expected = unet(x)
            assert torch.allclose(unet_top.forward(unet, x), expected, atol=1e-4)
            channels_last = x.contiguous(memory_format=torch.channels_last_3d)
            assert torch.allclose(unet_top.forward(unet.to(memory_format=torch.channels_last_3d),
                                                   channels_last), expected, atol=1e-4)
    assert not unet_top.foldable(UNet(3, 1, 1, (8, 16), (2,), num_res_units=0, norm="batch"))
    assert not unet_top.foldable(UNet(3, 1, 2, (8, 16), (2,), num_res_units=1, norm="batch"))
