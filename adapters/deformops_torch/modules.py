"""Modules: a torchvision-compatible ``DeformConv2d``, an mmcv-style ``DeformConv2dPack`` that
predicts its own offsets (and DCNv2 mask), and the original project's ``ConvOffset2D``."""

import math
import numbers
import operator

import numpy as np
import torch
from torch import nn

import deformops
from torch.nn import init

from .ops import _pair, deform_conv2d, deform_sample


def _positive_int(value, name):
    """``value`` as a Python int (NumPy integers too: stored as given, torch.compile would
    trace them as tensors); TypeError for anything but an integer (a bool included),
    ValueError for one below 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def _check_input(input, predictor, name, cls):
    """The checks of deformops' own ops, for the argument ``name`` of a module whose
    ``predictor`` conv runs first (it would raise bare RuntimeErrors): a TypeError for a
    non-tensor, a non-floating tensor, or one of another dtype than the predictor's weight
    (outside autocast); a ValueError unless it is (N, Cin, H, W) with the predictor's Cin and
    an output of at least one pixel."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    weight = predictor.weight
    if not input.is_floating_point() or (
            input.dtype != weight.dtype
            and not torch.is_autocast_enabled(input.device.type)):
        raise TypeError(f"{name} must have this {cls}'s dtype {weight.dtype}, got {input.dtype}")
    channels = predictor.in_channels
    if input.dim() != 4 or input.shape[1] != channels:
        raise ValueError(f"{name} must be (N, {channels}, H, W) for this {cls}, got shape "
                         f"{tuple(input.shape)}")
    for a in (0, 1):
        size = input.shape[2 + a] + 2 * predictor.padding[a]
        span = predictor.dilation[a] * (predictor.kernel_size[a] - 1) + 1
        if size < span:
            raise ValueError(
                f"{name} of shape {tuple(input.shape)} is smaller than this {cls}'s kernel "
                f"{predictor.kernel_size} with dilation {predictor.dilation} and padding "
                f"{predictor.padding}: the output would be empty")


class _InitConv2d(nn.Conv2d):
    """A predictor ``nn.Conv2d`` whose ``reset_parameters`` keeps its module's initialisation
    (zeros, or a normal weight of standard deviation ``std``; a zero bias): torch's idiom of
    resetting every submodule (a model built on the meta device, FSDP) would otherwise give
    it Kaiming's, and nonzero offsets."""

    def __init__(self, *args, std=0.0, **kwargs):
        self.std = std
        super().__init__(*args, **kwargs)

    def _get_name(self):  # printed as the nn.Conv2d it is
        return "Conv2d"

    def reset_parameters(self):
        super().reset_parameters()  # draws as nn.Conv2d does: later layers' seeds unchanged
        if self.std:
            nn.init.normal_(self.weight, 0.0, float(self.std))
        else:
            nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class DeformConv2d(nn.Module):
    """Deformable convolution with external offsets, a drop-in for ``torchvision.ops.DeformConv2d``.

    Same constructor, parameters (``weight`` (Cout, Cin/groups, kh, kw), ``bias`` (Cout,)),
    initialisation and ``forward(input, offset, mask=None)``; see
    :func:`deformops_torch.deform_conv2d` for the offset and mask channel order.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, dilation : int or (int, int)
    groups : int
        Convolution groups; must divide both channel counts.
    bias : bool
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__()
        in_channels = _positive_int(in_channels, "in_channels")
        out_channels = _positive_int(out_channels, "out_channels")
        groups = _positive_int(groups, "groups")
        if in_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups != 0:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(_pair(kernel_size, "kernel_size", 1))
        self.stride = tuple(_pair(stride, "stride", 1))
        self.padding = tuple(_pair(padding, "padding"))
        self.dilation = tuple(_pair(dilation, "dilation", 1))
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """torchvision's (and ``nn.Conv2d``'s) initialisation: Kaiming-uniform weight with
        a = sqrt(5), bias uniform in ±1/sqrt(fan_in)."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input, offset, mask=None):
        """
        Parameters
        ----------
        input : Tensor, (N, Cin, H, W)
        offset : Tensor, (N, 2*G*kh*kw, Ho, Wo)
        mask : Tensor, (N, G*kh*kw, Ho, Wo), optional

        Returns
        -------
        Tensor, (N, Cout, Ho, Wo)
        """
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, mask=mask)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class DeformConv2dPack(DeformConv2d):
    """Deformable convolution that predicts its own offsets (DCNv1) and mask (DCNv2).

    Like mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``: a regular convolution
    ``conv_offset`` with the same kernel, stride, padding and dilation, zero-initialised, predicts
    per output pixel ``2*G*kh*kw`` offsets and, with ``modulated=True``, ``G*kh*kw`` mask logits
    through a sigmoid. At initialisation the offsets are 0 and the mask 0.5 everywhere (mmcv's
    convention), so an unmodulated pack starts as exactly the regular convolution.

    The predictor's output channels are ``[offsets (channel order of deform_conv2d), mask
    logits]``; mmcv instead interleaves its chunks, so mmcv checkpoints need their
    ``conv_offset`` rows permuted.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        As :class:`DeformConv2d`.
    offset_groups : int
        G: the input channels split into G contiguous blocks, each with its own offsets.
    modulated : bool
        DCNv2: also predict a sigmoid mask per sample.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, offset_groups=1, bias=True, modulated=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        offset_groups = _positive_int(offset_groups, "offset_groups")
        if in_channels % offset_groups:
            raise ValueError(f"offset_groups ({offset_groups}) must be >= 1 and divide "
                             f"in_channels ({in_channels})")
        if not isinstance(modulated, (bool, np.bool_)):
            raise TypeError(f"modulated must be a bool, got {modulated!r}")
        self.offset_groups = offset_groups
        self.modulated = bool(modulated)
        taps = offset_groups * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = _InitConv2d(self.in_channels, (3 if modulated else 2) * taps,
                                       self.kernel_size, self.stride, self.padding,
                                       self.dilation, bias=True)

    def reset_parameters(self):
        """:class:`DeformConv2d`'s initialisation, and the offset predictor's zeros."""
        super().reset_parameters()
        if hasattr(self, "conv_offset"):  # not yet while DeformConv2d.__init__ runs
            self.init_offset()

    def init_offset(self):
        """Zero the offset predictor: offsets 0 (and mask 0.5) for every input."""
        self.conv_offset.reset_parameters()

    def forward(self, input):
        """
        Parameters
        ----------
        input : Tensor, (N, Cin, H, W)

        Returns
        -------
        Tensor, (N, Cout, Ho, Wo)
        """
        _check_input(input, self.conv_offset, "input", "DeformConv2dPack")
        pred = self.conv_offset(input)
        n_offset = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset = pred[:, :n_offset]
        mask = torch.sigmoid(pred[:, n_offset:]) if self.modulated else None
        return super().forward(input, offset, mask)

    def extra_repr(self):
        s = super().extra_repr()
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.modulated:
            s += ", modulated=True"
        return s


class ConvOffset2D(nn.Module):
    """The original project's deformable layer (felixlaumon/deform-conv), done right.

    A 3x3 convolution without bias predicts one (dy, dx) per channel and pixel; every channel is
    then resampled at its own offsets with :func:`deformops_torch.deform_sample`. Channel c uses
    predictor outputs ``2c`` (dy) and ``2c+1`` (dx) (the original scrambled them with a transpose
    and a reshape). The output has the input's shape.

    Parameters
    ----------
    channels : int
        C, the input (and output) channels.
    init_normal_stddev : float
        Standard deviation of the predictor's normal initialisation (the original's 0.01);
        0 initialises it to zeros (offsets start at exactly 0).
    order : {0, 1}
        Interpolation order (bilinear by default, as the original).
    mode : str
        Border mode of :func:`deformops.sample`; 'nearest' (clamp to the edge) as in the
        original, which clipped coordinates into the image.
    """

    def __init__(self, channels, init_normal_stddev=0.01, order=1, mode="nearest"):
        super().__init__()
        channels = _positive_int(channels, "channels")
        if isinstance(init_normal_stddev, bool) or not isinstance(init_normal_stddev,
                                                                   numbers.Real):
            raise TypeError(f"init_normal_stddev must be a number, got {init_normal_stddev!r}")
        if not (init_normal_stddev >= 0 and math.isfinite(init_normal_stddev)):
            raise ValueError(f"init_normal_stddev must be a finite number >= 0, got "
                             f"{init_normal_stddev!r}")
        # order and mode by the core's own rules and messages, now rather than at the first call
        deformops.sample(np.zeros((0, 1, 1, 1)), np.zeros((0, 2, 1, 1)), order=order, mode=mode)
        self.channels = channels
        self.init_normal_stddev = init_normal_stddev
        self.order = operator.index(order)
        self.mode = mode
        self.conv = _InitConv2d(channels, 2 * channels, 3, padding=1, bias=False,
                                std=init_normal_stddev)

    def reset_parameters(self):
        """The predictor's normal initialisation (zeros for ``init_normal_stddev=0``)."""
        self.conv.reset_parameters()

    def forward(self, x):
        """
        Parameters
        ----------
        x : Tensor, (N, C, H, W)

        Returns
        -------
        Tensor, (N, C, H, W)
        """
        _check_input(x, self.conv, "x", "ConvOffset2D")
        return deform_sample(x, self.conv(x), order=self.order, mode=self.mode)

    def extra_repr(self):
        return (f"{self.channels}, init_normal_stddev={self.init_normal_stddev}, "
                f"order={self.order}, mode={self.mode!r}")
