"""Warp a synthetic image with ``deformops.deform_sample`` and compare with scipy.

Builds a 1 x 3 x 128 x 128 colour image (checkerboard with a disc), a smooth random offset field
(a swirl plus a few low-frequency sinusoids), warps the image with ``dops.deform_sample`` (order 1,
mode 'reflect'), computes the same warp with ``scipy.ndimage.map_coordinates`` plane by plane,
prints the largest absolute difference and writes a figure:

    python examples/warp_demo.py [--out examples/out/warp_demo.png] [--size 128] [--seed 0]

Offset channel order (NCHW): channel 0 is dy (rows), channel 1 is dx (columns); output pixel
(i, j) samples the input at (i + dy, j + dx).
"""

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from scipy import ndimage

import deformops as dops

MODE = "reflect"
ORDER = 1
HERE = os.path.dirname(os.path.abspath(__file__))


def make_image(size):
    """(1, 3, size, size) float64 in [0, 1]: a two-colour checkerboard with an orange disc."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cell = max(size // 8, 1)
    board = ((yy // cell + xx // cell) % 2).astype(np.float64)
    light, dark = np.array([0.92, 0.92, 0.85]), np.array([0.15, 0.25, 0.45])
    img = board[..., None] * light + (1 - board[..., None]) * dark
    r = np.hypot(yy - 0.55 * size, xx - 0.45 * size)
    disc = np.clip(0.22 * size - r + 0.5, 0.0, 1.0)[..., None]  # one-pixel anti-aliased edge
    img = (1 - disc) * img + disc * np.array([0.95, 0.45, 0.1])
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


def make_offsets(size, seed):
    """(1, 2, size, size) smooth random offsets in pixels: channel 0 = dy, channel 1 = dx."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # swirl: rotate about a point near the centre by an angle that decays with the radius
    cy, cx = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
    angle = (
        rng.choice([-1, 1])
        * rng.uniform(0.8, 1.4)
        * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.25 * size) ** 2))
    )
    cos, sin = np.cos(angle), np.sin(angle)
    dy = cy + sin * (xx - cx) + cos * (yy - cy) - yy
    dx = cx + cos * (xx - cx) - sin * (yy - cy) - xx
    # plus a few random low-frequency ripples
    for _ in range(3):
        ky, kx = rng.uniform(-3, 3, size=2) * 2 * np.pi / size
        phase = rng.uniform(0, 2 * np.pi)
        amp_y, amp_x = rng.normal(0, 0.02 * size, size=2)
        wave = np.sin(ky * yy + kx * xx + phase)
        dy += amp_y * wave
        dx += amp_x * wave
    return np.stack([dy, dx])[None]


def scipy_warp(img, offset):
    """The same warp with scipy.ndimage.map_coordinates, one plane at a time."""
    _, C, H, W = img.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    coords = np.stack([yy + offset[0, 0], xx + offset[0, 1]])
    out = np.empty_like(img)
    for c in range(C):
        out[0, c] = ndimage.map_coordinates(img[0, c], coords, order=ORDER, mode=MODE)
    return out


def to_rgb(a):
    return np.clip(a[0].transpose(1, 2, 0), 0, 1)


def plot(img, warped, ref, offset, path):
    diff = np.abs(warped - ref).max(axis=1)[0]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.4), constrained_layout=True)
    for ax, a, title in zip(
        axes[:3],
        (img, warped, ref),
        (
            "original",
            f"deformops.deform_sample\n(order {ORDER}, mode '{MODE}')",
            "scipy.ndimage.map_coordinates",
        ),
        strict=True,
    ):
        ax.imshow(to_rgb(a), interpolation="nearest")
        ax.set_title(title)
    im = axes[3].imshow(diff, cmap="magma", interpolation="nearest")
    axes[3].set_title(f"|deformops - scipy|, max {diff.max():.1e}")
    fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.04)

    size = img.shape[-1]
    step = max(size // 16, 1)
    yy, xx = np.mgrid[0:size:step, 0:size:step]
    dy, dx = offset[0, 0, ::step, ::step], offset[0, 1, ::step, ::step]
    ax = axes[4]
    ax.imshow(to_rgb(img), alpha=0.35, interpolation="nearest")
    # arrows from each output pixel to the point it samples (image axes: y down)
    ax.quiver(
        xx,
        yy,
        dx,
        dy,
        np.hypot(dx, dy),
        cmap="viridis",
        angles="xy",
        scale_units="xy",
        scale=1,
        width=0.004,
    )
    ax.set_title("offsets (output pixel -> sample point)")
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        default=os.path.join(HERE, "out", "warp_demo.png"),
        help="PNG to write (default: examples/out/warp_demo.png)",
    )
    p.add_argument("--size", type=int, default=128, help="image height and width (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the offset field (default 0)")
    args = p.parse_args(argv)

    img = make_image(args.size)
    offset = make_offsets(args.size, args.seed)

    t0 = time.perf_counter()
    warped = dops.deform_sample(img, offset, order=ORDER, mode=MODE)
    t1 = time.perf_counter()
    ref = scipy_warp(img, offset)
    t2 = time.perf_counter()

    err = float(np.max(np.abs(warped - ref)))
    print(
        f"image {img.shape}, offsets {offset.shape}, |offset| up to "
        f"{np.hypot(offset[0, 0], offset[0, 1]).max():.1f} px"
    )
    print(
        f"deformops.deform_sample: {1e3 * (t1 - t0):.0f} ms (first call: Numba compiles "
        f"or loads its cache); scipy: {1e3 * (t2 - t1):.1f} ms"
    )
    print(f"max |deformops - scipy| = {err:.3e}")
    plot(img, warped, ref, offset, args.out)
    print(f"wrote {args.out}")
    return 0 if err <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
