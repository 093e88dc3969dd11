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
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mnist_data
from scaled_mnist_results import ORIGINAL, VARIANTS, markdown_table


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
    p.add_argument("--threads", type=int, default=None,
                   help="torch or TensorFlow threads, and Numba threads")
    p.add_argument("--framework", choices=("torch", "keras"), default="torch",
                   help="PyTorch with deformops_torch, or Keras 3 with deformops_tf")
    p.add_argument("--data-root", default=None, help="a torchvision MNIST download root")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "out"))
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.full:
        args.epochs_cnn, args.epochs_finetune = 10, 20
        args.finetune_images = args.cnn_images = 60000
        args.test_images = 10000
    if set(args.variants) - set(VARIANTS):
        p.error(f"--variants must use letters of {''.join(VARIANTS)}, got {args.variants!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    x_train, y_train, x_test, y_test, source = mnist_data.load_mnist(args.data_root)
    x_test, y_test = x_test[:args.test_images], y_test[:args.test_images]
    print(f"MNIST from {source}: {len(x_train)} train, {len(x_test)} test images")
    scaled_tests = mnist_data.scaled_test_sets(x_test, args.seed, args.test_draws)
    data = (x_train, y_train, x_test, y_test, scaled_tests)
    if args.framework == "torch":
        import mnist_torch as framework
    else:
        import mnist_keras as framework
    results, curves, models, regular_ms = framework.run(args, data)

    wall = time.perf_counter() - t_start
    meta = {
        "framework": args.framework, "seed": args.seed, "epochs_cnn": args.epochs_cnn,
        "epochs_finetune": args.epochs_finetune, "cnn_images": args.cnn_images,
        "finetune_images": args.finetune_images, "test_images": len(x_test),
        "test_draws": args.test_draws, "data": source, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "phase1_step_ms": regular_ms, "wall_s": wall,
    }
    table = markdown_table(results, meta)
    speed = [f"({key}) {results[key]['step_ms']:.1f} ms = "
             f"{results[key]['step_ms'] / regular_ms:.2f}x the regular CNN's {regular_ms:.1f} ms"
             for key in ("c", "d", "e") if key in results and results[key]["step_ms"]
             and regular_ms]
    with open(os.path.join(args.out, "scaled_mnist.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "original": ORIGINAL, "curves": curves},
                  f, indent=1)
    with open(os.path.join(args.out, "scaled_mnist.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plots:
        import mnist_plots

        mnist_plots.plot_curves(curves, os.path.join(args.out, "scaled_mnist_curves.png"))
        traced = {k: models[k] for k in ("d", "e") if k in models}
        if traced and args.framework == "torch":
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
