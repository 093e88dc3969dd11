"""The 4-layer CNN of the original scaled-MNIST experiment and its deformable variants (PyTorch).

Layers as in felixlaumon/deform-conv: conv11 (32) -> conv12 (64, stride 2) -> conv21 (128) ->
conv22 (128, stride 2), each 3x3 with bias, each followed by ReLU and BatchNorm (Keras eps 1e-3,
momentum 0.99 = torch momentum 0.01); global average pooling, Dense(10). TF 'same' padding of
the stride-2 convs pads 0 rows/columns before and 1 after, reproduced with an explicit pad.

Deformable variants insert layers in front of conv12, conv21 and conv22 (never conv11):

- ``"offset2d"``: the original's ConvOffset2D, one (dy, dx) per channel and pixel;
- ``"dcn"``: the three convs become DeformConv2dPack (per-tap offsets, zero-initialised) with the
  regular weights copied in.
"""

import copy

import torch
import torch.nn.functional as F
from deformops_torch import ConvOffset2D, DeformConv2dPack
from torch import nn

# name, in channels, out channels, stride
CONVS = (("conv11", 1, 32, 1), ("conv12", 32, 64, 2), ("conv21", 64, 128, 1),
         ("conv22", 128, 128, 2))
DEFORMED = ("conv12", "conv21", "conv22")
BN_EPS, BN_MOMENTUM = 1e-3, 0.01


class SamePad(nn.Module):
    """TensorFlow 'same' padding of a 3x3 stride-2 conv on an even size: 0 before, 1 after."""

    def forward(self, x):
        return F.pad(x, (0, 1, 0, 1))


def _conv(cin, cout, stride):
    if stride == 1:
        return nn.Conv2d(cin, cout, 3, padding=1)
    return nn.Sequential(SamePad(), nn.Conv2d(cin, cout, 3, stride=stride))


class CNN(nn.Module):
    """The regular CNN. ``blocks[name]`` is conv -> ReLU -> BatchNorm for each conv name."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            name: nn.Sequential(
                nn.Identity(),  # slot of the deformable layer in front of the conv
                _conv(cin, cout, stride), nn.ReLU(),
                nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM))
            for name, cin, cout, stride in CONVS})
        self.dense = nn.Linear(128, 10)

    def forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return self.dense(x.mean((2, 3)))

    def conv(self, name):
        """The nn.Conv2d of block ``name``."""
        c = self.blocks[name][1]
        return c if isinstance(c, nn.Conv2d) else c[1]

    def batchnorms(self):
        return [b[3] for b in self.blocks.values()]


def with_conv_offsets(cnn, init_normal_stddev=0.01, mode="nearest"):
    """A copy of ``cnn`` with a ConvOffset2D in front of conv12, conv21 and conv22."""
    model = copy.deepcopy(cnn)
    for name, cin, _, _ in CONVS:
        if name in DEFORMED:
            model.blocks[name][0] = ConvOffset2D(cin, init_normal_stddev, mode=mode)
    return model


def with_dcn(cnn, modulated=False):
    """A copy of ``cnn`` whose conv12, conv21 and conv22 are DeformConv2dPack layers carrying the
    regular weights, with zero-initialised offset predictors (so it starts as ``cnn`` exactly)."""
    model = copy.deepcopy(cnn)
    for name, cin, cout, stride in CONVS:
        if name not in DEFORMED:
            continue
        regular = model.conv(name)
        dcn = DeformConv2dPack(cin, cout, 3, stride=stride, padding=1 if stride == 1 else 0,
                               modulated=modulated)
        with torch.no_grad():
            dcn.weight.copy_(regular.weight)
            dcn.bias.copy_(regular.bias)
        model.blocks[name][1] = dcn if stride == 1 else nn.Sequential(SamePad(), dcn)
    return model


def offset_layers(model):
    """The modules that predict offsets: ConvOffset2D convs or DeformConv2dPack.conv_offset."""
    out = []
    for m in model.modules():
        if isinstance(m, ConvOffset2D):
            out.append(m.conv)
        elif isinstance(m, DeformConv2dPack):
            out.append(m.conv_offset)
    return out
