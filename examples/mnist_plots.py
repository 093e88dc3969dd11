"""Pictures of the scaled-MNIST experiment: training curves (any framework) and traced sampling
locations (PyTorch models; torch is imported only for those)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# The deformed convs from the last to the first: (block name, stride, padding before the input).
GEOMETRY = (("conv22", 2, 0), ("conv21", 1, 1), ("conv12", 2, 0))
TAPS = np.array([(i, j) for i in range(3) for j in range(3)], float)  # k = 3 i + j


def plot_curves(curves, path):
    """Running training loss and accuracy against images seen, one line per phase/variant."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in curves.items():
        if not hist:
            continue
        seen, loss, acc = np.array(hist).T
        ax_loss.plot(seen, loss, label=name)
        ax_acc.plot(seen, 100 * acc, label=name)
    ax_loss.set(xlabel="training images seen", ylabel="running loss", yscale="log")
    ax_acc.set(xlabel="training images seen", ylabel="running accuracy (%)")
    ax_acc.legend(fontsize=8)
    ax_loss.set_title("phase 1 on MNIST, phase 2 on scaled MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _offset_maps(model, image):
    """Per deformed conv: ('dcn', (9, 2, Ho, Wo)) per-tap offsets, ('shift', (2, H, W))
    channel-mean ConvOffset2D offsets, or ('none', None)."""
    import torch
    from deformops_torch import ConvOffset2D, DeformConv2dPack

    found = {}
    handles = []
    for name, _, _ in GEOMETRY:
        block = model.blocks[name]
        for m in block.modules():
            if isinstance(m, ConvOffset2D):
                handles.append(m.conv.register_forward_hook(
                    lambda mod, i, o, name=name: found.__setitem__(
                        name, ("shift", torch.stack([o[0, 0::2].mean(0), o[0, 1::2].mean(0)])))))
            elif isinstance(m, DeformConv2dPack):
                handles.append(m.conv_offset.register_forward_hook(
                    lambda mod, i, o, name=name: found.__setitem__(
                        name, ("dcn", o[0, :18].reshape(9, 2, *o.shape[2:])))))
    model.eval()
    try:
        with torch.no_grad():
            model(torch.from_numpy(image[None, None]))
    finally:
        for h in handles:
            h.remove()
    return {k: (kind, v.numpy().astype(float)) for k, (kind, v) in found.items()}


def _lookup(points, field):
    """Values of ``field`` (..., H, W) at the nearest pixel of each point (P, 2), clamped."""
    H, W = field.shape[-2:]
    iy = np.clip(np.rint(points[:, 0]), 0, H - 1).astype(int)
    ix = np.clip(np.rint(points[:, 1]), 0, W - 1).astype(int)
    return field[..., iy, ix], iy, ix


def trace_sampling_points(model, image, unit):
    """Input-pixel positions (9**3, 2) that conv22 output ``unit`` (y, x) reads, traced back
    through conv22, conv21 and conv12 with the offsets the model predicts for ``image``, as in
    Figure 5 of Dai et al. (2017). ConvOffset2D offsets are averaged over channels."""
    maps = _offset_maps(model, image)
    points = np.array([unit], float)
    sizes = {"conv22": (7, 7), "conv21": (14, 14), "conv12": (14, 14)}
    for name, stride, pad in GEOMETRY:
        kind, field = maps.get(name, ("none", None))
        H, W = sizes[name]
        oy = np.clip(np.rint(points[:, 0]), 0, H - 1)
        ox = np.clip(np.rint(points[:, 1]), 0, W - 1)
        base = np.stack([oy * stride - pad, ox * stride - pad], 1)  # (P, 2)
        taps = base[:, None, :] + TAPS[None]  # (P, 9, 2)
        if kind == "dcn":
            off = field[:, :, oy.astype(int), ox.astype(int)]  # (9, 2, P)
            taps = taps + off.transpose(2, 0, 1)
        points = taps.reshape(-1, 2)
        if kind == "shift":  # ConvOffset2D in front of this conv moves its input positions
            shift, _, _ = _lookup(points, field)
            points = points + shift.T
    return points


def _unit_at_centre(image):
    """The conv22 output unit (7x7 map) whose regular grid is centred nearest the digit's centre
    of mass (unit u is centred on image pixel 4u + 3)."""
    w = image / image.sum()
    yy, xx = np.mgrid[:28, :28]
    cy, cx = (w * yy).sum(), (w * xx).sum()
    return tuple(int(np.clip(np.rint((c - 3) / 4), 0, 6)) for c in (cy, cx))


def plot_sampling_locations(models, plain, scaled, path):
    """Sampling locations of one conv22 unit for a few digits, plain (left) and scaled (right),
    one row per model, plus the regular grid without offsets."""
    images = list(plain) + list(scaled)
    names = {"d": "(d) ConvOffset2D\n(channel mean)", "e": "(e) DCN per tap"}
    rows = [("regular CNN\n(no offsets)", None)] + [(names.get(k, k), m) for k, m in models.items()]
    fig, axes = plt.subplots(len(rows), len(images), figsize=(1.6 * len(images), 1.8 * len(rows)),
                             squeeze=False)
    for r, (name, model) in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            unit = _unit_at_centre(img)
            if model is None:
                pts = _regular_points(unit)
            else:
                pts = trace_sampling_points(model, img, unit)
            ax.scatter(pts[:, 1], pts[:, 0], s=3, c="red", alpha=0.25, linewidths=0)
            ax.plot(unit[1] * 4 + 3, unit[0] * 4 + 3, "g+", ms=8)  # centre of its grid
            ax.set_xlim(-4, 31)
            ax.set_ylim(31, -4)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title("plain" if c < len(plain) else "scaled", fontsize=8)
    fig.suptitle("Input positions read by one conv22 unit (green +), traced through conv22, "
                 "conv21 and conv12", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _regular_points(unit):
    points = np.array([unit], float)
    for _, stride, pad in GEOMETRY:
        base = points * stride - pad
        points = (base[:, None, :] + TAPS[None]).reshape(-1, 2)
    return points
