"""PyTorch bindings of deformops: differentiable operators and modules.

>>> import torch, deformops_torch as dt
>>> x = torch.randn(2, 8, 16, 16, requires_grad=True)
>>> layer = dt.DeformConv2dPack(8, 16, 3, padding=1, modulated=True)
>>> layer(x).sum().backward()

Operators (``torch.ops.deformops.*``, registered with ``torch.library.custom_op``, so they work
under ``torch.compile(fullgraph=True)``): :func:`deform_conv2d` (torchvision's signature),
:func:`sample`, :func:`deform_sample`. Modules: :class:`DeformConv2d` (drop-in for
``torchvision.ops.DeformConv2d``), :class:`DeformConv2dPack` (own offset/mask predictor, like
mmcv), :class:`ConvOffset2D` (the original Keras project's layer).
"""

from .modules import ConvOffset2D, DeformConv2d, DeformConv2dPack
from .ops import deform_conv2d, deform_sample, sample

__all__ = ["deform_conv2d", "deform_sample", "sample", "DeformConv2d", "DeformConv2dPack",
           "ConvOffset2D"]
