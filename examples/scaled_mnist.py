"""Scaled MNIST, honestly: what deformable offsets add beyond refitting BatchNorm.

Reproduces the experiment of felixlaumon/deform-conv (a 4-layer CNN trained on MNIST, then
fine-tuned on "scaled" MNIST with ConvOffset2D layers), with the controls the original lacked.
Every variant starts from the same phase-1 CNN and gets the same fine-tuning budget:

(a) the regular CNN, no fine-tuning;
(b) BatchNorm-only refit on scaled data (what the original's offsets, which never moved, left);
(c) ConvOffset2D offsets only, BatchNorm frozen in eval mode;
(d) ConvOffset2D offsets plus BatchNorm (the original protocol, with offsets that do move);
(e) DCN per-tap offsets (DeformConv2dPack, zero-initialised, regular weights copied), offsets only;
(f) the fair baseline: the whole regular CNN fine-tuned on scaled data.

Phase 1: Adam 1e-3, batch 32, plain MNIST. Phase 2: Adam 5e-4, batch 32, scaled MNIST drawn
afresh each epoch; convs and dense frozen except in (f). Test accuracy on plain MNIST and on
``--test-draws`` fixed, seeded scaled test sets (mean and spread).

Default (``make demo``): 1 + 1 epochs, fine-tuning epochs of 10000 images; ``--full`` runs the
original's 10 + 20 epochs of 60000 images. Writes ``<out>/scaled_mnist.json``, ``.md`` and two
pictures (training curves, sampling locations).
"""

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mnist_data  # noqa: E402
import mnist_models  # noqa: E402
import mnist_plots  # noqa: E402

ORIGINAL = {  # felixlaumon/deform-conv README: test accuracy (%)
    "regular": {"mnist": 98.74, "scaled": 57.01},
    "deformable": {"mnist": 97.27, "scaled": 92.55},
}
VARIANTS = {
    "a": "regular CNN, no fine-tuning",
    "b": "BatchNorm-only refit",
    "c": "ConvOffset2D offsets only (BN frozen)",
    "d": "ConvOffset2D offsets + BN (original protocol)",
    "e": "DCN per-tap offsets only (BN frozen)",
    "f": "whole regular CNN fine-tuned",
}
BATCH = 32
LR_CNN, LR_FINETUNE = 1e-3, 5e-4
EVAL_BATCH = 500


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs-cnn", type=int, default=1, help="phase-1 epochs on plain MNIST")
    p.add_argument("--epochs-finetune", type=int, default=1, help="phase-2 epochs on scaled MNIST")
    p.add_argument("--finetune-images", type=int, default=10000,
                   help="training images per fine-tuning epoch (60000 = all)")
    p.add_argument("--cnn-images", type=int, default=60000,
                   help="training images per phase-1 epoch (60000 = all)")
    p.add_argument("--test-images", type=int, default=10000, help="test images per test set")
    p.add_argument("--test-draws", type=int, default=3, help="seeded scaled test sets")
    p.add_argument("--full", action="store_true",
                   help="the original schedule: 10 + 20 epochs of all 60000 images")
    p.add_argument("--variants", default="abcdef", help="which variants to run (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch and Numba threads")
    p.add_argument("--framework", choices=("torch",), default="torch")
    p.add_argument("--data-root", default=None, help="a torchvision MNIST download root")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "out"))
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.full:
        args.epochs_cnn, args.epochs_finetune = 10, 20
        args.finetune_images = args.cnn_images = args.test_images = 60000
    if set(args.variants) - set(VARIANTS):
        p.error(f"--variants must use letters of {''.join(VARIANTS)}, got {args.variants!r}")
    return args


# ----------------------------------------------------------------------------------------------
# training and evaluation


def _freeze_all_but(model, params):
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if id(p) in keep]


def train(model, params, images, labels, *, epochs, images_per_epoch, lr, bn_train, scale, rng,
          desc):
    """Adam on ``params`` only (everything else frozen); returns the history and step times.

    ``bn_train`` False keeps BatchNorm in eval mode (running statistics frozen); ``scale`` draws
    a fresh scaled version of the epoch's images.
    """
    params = _freeze_all_but(model, params)
    opt = torch.optim.Adam(params, lr)
    history, step_s = [], []
    seen, run_loss, run_acc = 0, None, None
    for epoch in range(epochs):
        idx = rng.permutation(len(images))[:images_per_epoch]
        x = images[idx]
        if scale:
            x = mnist_data.scale_images(x, rng)
        x, y = torch.from_numpy(x[:, None]), torch.from_numpy(labels[idx])
        model.train(bn_train)
        bar = tqdm(range(0, len(x), BATCH), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                   unit="step", leave=False, mininterval=1.0)
        for s in bar:
            t0 = time.perf_counter()
            xb, yb = x[s:s + BATCH], y[s:s + BATCH]
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            step_s.append(time.perf_counter() - t0)
            acc = (logits.argmax(1) == yb).float().mean().item()
            run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
            run_acc = acc if run_acc is None else 0.98 * run_acc + 0.02 * acc
            seen += len(xb)
            if (s // BATCH) % 25 == 0:
                history.append((seen, run_loss, run_acc))
                bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{100 * run_acc:.1f}%")
        bar.close()
        print(f"  {desc} epoch {epoch + 1}/{epochs}: running loss {run_loss:.3f}, "
              f"accuracy {100 * run_acc:.1f}%")
    # the median step, skipping the first steps (JIT compilation, allocator warm-up)
    steady = step_s[min(20, len(step_s) // 2):]
    return {"history": history, "step_ms": 1e3 * float(np.median(steady)) if steady else None}


@torch.no_grad()
def evaluate(model, images, labels, offset_stats=False):
    """Accuracy (%) on (n, 28, 28) images; with ``offset_stats`` also the mean |offset| (px) that
    the model's offset predictors output on them."""
    model.eval()
    layers = mnist_models.offset_layers(model) if offset_stats else []
    sums = {"abs": 0.0, "count": 0}

    def hook(module, inputs, output):
        sums["abs"] += output.abs().sum().item()
        sums["count"] += output.numel()

    handles = [m.register_forward_hook(hook) for m in layers]
    correct = 0
    try:
        for s in range(0, len(images), EVAL_BATCH):
            xb = torch.from_numpy(images[s:s + EVAL_BATCH, None])
            correct += (model(xb).argmax(1).numpy() == labels[s:s + EVAL_BATCH]).sum()
    finally:
        for h in handles:
            h.remove()
    mean_offset = sums["abs"] / sums["count"] if sums["count"] else None
    return 100.0 * correct / len(images), mean_offset


# ----------------------------------------------------------------------------------------------
# the variants


def finetune_setup(variant, cnn):
    """Return (model, trainable parameters, BatchNorm in train mode) for a variant."""
    if variant == "b":
        model = copy.deepcopy(cnn)
        return model, [p for bn in model.batchnorms() for p in bn.parameters()], True
    if variant in ("c", "d"):
        model = mnist_models.with_conv_offsets(cnn)
        params = [p for m in mnist_models.offset_layers(model) for p in m.parameters()]
        if variant == "d":
            params += [p for bn in model.batchnorms() for p in bn.parameters()]
        return model, params, variant == "d"
    if variant == "e":
        model = mnist_models.with_dcn(cnn)
        return model, [p for m in mnist_models.offset_layers(model) for p in m.parameters()], False
    if variant == "f":
        model = copy.deepcopy(cnn)
        return model, list(model.parameters()), True
    raise ValueError(variant)


def markdown_table(results, meta):
    lines = [
        f"| variant | MNIST | scaled MNIST (mean ± sd, {meta['test_draws']} draws) | "
        "mean \\|offset\\| (px) | step (ms) |",
        "|---|---|---|---|---|",
    ]
    for key, r in results.items():
        off = "" if r["mean_offset_px"] is None else f"{r['mean_offset_px']:.3f}"
        step = "" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        lines.append(f"| ({key}) {VARIANTS[key]} | {r['mnist']:.2f}% | {r['scaled_mean']:.2f}% ± "
                     f"{r['scaled_sd']:.2f} | {off} | {step} |")
    lines += [
        "",
        "The original (felixlaumon/deform-conv README), for comparison: regular CNN "
        f"{ORIGINAL['regular']['mnist']}% on MNIST, {ORIGINAL['regular']['scaled']}% on scaled "
        f"MNIST; deformable CNN {ORIGINAL['deformable']['mnist']}% / "
        f"{ORIGINAL['deformable']['scaled']}% (its offsets never moved: variant (b) is what it "
        "measured).",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        import numba

        numba.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    x_train, y_train, x_test, y_test, source = mnist_data.load_mnist(args.data_root)
    x_test, y_test = x_test[:args.test_images], y_test[:args.test_images]
    print(f"MNIST from {source}: {len(x_train)} train, {len(x_test)} test images")
    scaled_tests = mnist_data.scaled_test_sets(x_test, args.seed, args.test_draws)

    print(f"phase 1: the regular CNN, {args.epochs_cnn} epoch(s) of {args.cnn_images} plain images")
    cnn = mnist_models.CNN()
    phase1 = train(cnn, list(cnn.parameters()), x_train, y_train, epochs=args.epochs_cnn,
                   images_per_epoch=args.cnn_images, lr=LR_CNN, bn_train=True, scale=False,
                   rng=rng, desc="phase 1")

    results, curves, models = {}, {"phase 1": phase1["history"]}, {}
    for key in args.variants:
        torch.manual_seed(args.seed + 1)
        if key == "a":
            model, run = cnn, {"history": [], "step_ms": phase1["step_ms"]}
        else:
            model, params, bn_train = finetune_setup(key, cnn)
            print(f"phase 2 ({key}) {VARIANTS[key]}: {args.epochs_finetune} epoch(s) of "
                  f"{args.finetune_images} scaled images")
            run = train(model, params, x_train, y_train, epochs=args.epochs_finetune,
                        images_per_epoch=args.finetune_images, lr=LR_FINETUNE,
                        bn_train=bn_train, scale=True, rng=np.random.default_rng(args.seed + 7),
                        desc=f"({key})")
            curves[f"({key})"] = run["history"]
        plain, _ = evaluate(model, x_test, y_test)
        scaled = [evaluate(model, s, y_test, offset_stats=(i == 0)) for i, s in
                  enumerate(scaled_tests)]
        accs = np.array([a for a, _ in scaled])
        results[key] = {
            "variant": VARIANTS[key], "mnist": plain, "scaled": accs.tolist(),
            "scaled_mean": float(accs.mean()), "scaled_sd": float(accs.std(ddof=1))
            if len(accs) > 1 else 0.0,
            "mean_offset_px": scaled[0][1], "step_ms": run["step_ms"],
        }
        models[key] = model
        print(f"  ({key}) MNIST {plain:.2f}%, scaled {accs.mean():.2f}% ± "
              f"{results[key]['scaled_sd']:.2f}" + (
                  f", mean |offset| {scaled[0][1]:.3f} px" if scaled[0][1] is not None else ""))

    wall = time.perf_counter() - t_start
    meta = {
        "seed": args.seed, "epochs_cnn": args.epochs_cnn, "epochs_finetune": args.epochs_finetune,
        "cnn_images": args.cnn_images, "finetune_images": args.finetune_images,
        "test_images": len(x_test), "test_draws": args.test_draws, "data": source,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "wall_s": wall,
    }
    table = markdown_table(results, meta)
    regular_ms = phase1["step_ms"]
    speed = []
    for key in ("d", "e"):
        if key in results and results[key]["step_ms"] and regular_ms:
            speed.append(f"({key}) {results[key]['step_ms']:.1f} ms = "
                         f"{results[key]['step_ms'] / regular_ms:.2f}x the regular CNN's "
                         f"{regular_ms:.1f} ms")
    with open(os.path.join(args.out, "scaled_mnist.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "original": ORIGINAL,
                   "curves": curves}, f, indent=1)
    with open(os.path.join(args.out, "scaled_mnist.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plots:
        mnist_plots.plot_curves(curves, os.path.join(args.out, "scaled_mnist_curves.png"))
        traced = {k: models[k] for k in ("d", "e") if k in models}
        if traced:
            mnist_plots.plot_sampling_locations(
                traced, x_test[:4], scaled_tests[0][:4],
                os.path.join(args.out, "scaled_mnist_sampling.png"))
    print()
    print(table)
    print()
    if speed:
        print("training step (batch 32): " + "; ".join(speed))
    print(f"wall time {wall / 60:.1f} min; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
