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
pictures (training curves, sampling locations). Phase 1 and each variant are stored as they
finish, and the part in training after each of its epochs (``<out>/checkpoints``); ``--resume``
goes on from them after a stop.
"""

import argparse
import ctypes
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mnist_data
import numpy as np
from mnist_checkpoints import Checkpoints
from scaled_mnist_results import ORIGINAL, VARIANTS, markdown_table, summarize


# glibc's mallopt parameters, and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: buffers up to 32 MiB come from the heap
TRIM_THRESHOLD = 512 << 20  # free memory the heap keeps before returning it to the OS


def keep_freed_memory():
    """Have glibc's malloc keep freed buffers for reuse instead of returning them to the OS.

    By default glibc serves buffers above a threshold that adapts to the sizes freed so far
    (128 KiB at first) with fresh ``mmap`` pages, and gives the heap's free top back to the OS
    once it exceeds twice that: a training step then page-faults its activations in again,
    every step. On the 2-core CI machine kind that cost the regular CNN's phase-1 step 3600-4000
    faults (39-41 ms instead of 30-31 ms), and ConvOffset2D's steps 5000-11000 faults (135-147
    ms instead of 119-131 ms), depending on what the process allocated before: step times, and
    their ratios, depended on the order the models ran in. This fixes both thresholds, as
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=536870912`` would. It does
    nothing where the C library is not glibc, or where the environment already sets glibc's
    malloc parameters (yours win).

    Returns
    -------
    bool
        True if both parameters were set.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


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
    p.add_argument("--resume", action="store_true",
                   help="load phase 1 and the variants already stored for these settings")
    args = p.parse_args(argv)
    if args.full:
        args.epochs_cnn, args.epochs_finetune = 10, 20
        args.finetune_images = args.cnn_images = 60000
        args.test_images = 10000
    if set(args.variants) - set(VARIANTS):
        p.error(f"--variants must use letters of {''.join(VARIANTS)}, got {args.variants!r}")
    return args


def run(fw, args, data, store):
    """Phase 1 and every variant of ``args.variants`` with framework module ``fw``
    (mnist_torch or mnist_keras), each loaded from ``store`` when resuming and stored when done.

    Returns ``(results, curves, models, phase1_step_ms, part_s)``: results per variant key,
    running training curves per phase, the trained models, the phase-1 median step time and the
    seconds each part took.
    """
    x_train, y_train, x_test, y_test, scaled_tests = data
    fw.seed(args.seed)
    cnn = fw.new_cnn()
    part = store.load("phase1")
    if part is None:
        print(f"phase 1: the regular CNN, {args.epochs_cnn} epoch(s) of {args.cnn_images} "
              f"plain images")
        t0 = time.perf_counter()
        epochs = store.epochs("phase1")
        phase1 = fw.train_cnn(cnn, x_train, y_train, args, np.random.default_rng(args.seed),
                              epoch_state=epochs)
        part = {"run": phase1, "weights": fw.get_weights(cnn),
                "seconds": time.perf_counter() - t0 + phase1["earlier_s"]}
        store.save("phase1", part)
        epochs.drop()
    else:
        fw.set_weights(cnn, part["weights"])
    phase1 = part["run"]
    results, curves, models = {}, {"phase 1": phase1["history"]}, {}
    part_s = {"phase 1": part["seconds"]}

    for key in args.variants:
        part = store.load(f"variant_{key}")
        if part is not None:
            models[key] = cnn if key == "a" else fw.variant_model(key, cnn)
            fw.set_weights(models[key], part["weights"])
        else:
            t0 = time.perf_counter()
            fw.seed(args.seed + 1)
            epochs = store.epochs(f"variant_{key}")
            if key == "a":
                model, run_, trained = cnn, {"history": None, "step_ms": phase1["step_ms"],
                                             "earlier_s": 0.0}, 0
            else:
                print(f"phase 2 ({key}) {VARIANTS[key]}: {args.epochs_finetune} epoch(s) of "
                      f"{args.finetune_images} scaled images")
                model, run_, trained = fw.finetune(key, cnn, x_train, y_train, args,
                                                   np.random.default_rng(args.seed + 7),
                                                   epoch_state=epochs)
            plain, _ = fw.evaluate(model, x_test, y_test)
            scaled = [fw.evaluate(model, s, y_test, offset_stats=(i == 0))
                      for i, s in enumerate(scaled_tests)]
            result = summarize(key, plain, [a for a, _ in scaled], scaled[0][1], run_["step_ms"],
                               n_trained=trained)
            part = {"result": result, "curve": run_["history"], "weights": fw.get_weights(model),
                    "seconds": time.perf_counter() - t0 + run_["earlier_s"]}
            store.save(f"variant_{key}", part)
            epochs.drop()
            models[key] = model
        results[key] = part["result"]
        part_s[f"({key})"] = part["seconds"]
        if part["curve"] is not None:
            curves[f"({key})"] = part["curve"]
    return results, curves, models, phase1["step_ms"], part_s


def main(argv=None):
    args = parse_args(argv)
    malloc_tuned = keep_freed_memory()
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
    if args.threads:
        framework.set_threads(args.threads)
    store = Checkpoints(args)
    results, curves, models, regular_ms, part_s = run(framework, args, data, store)

    wall = time.perf_counter() - t_start
    meta = {
        "framework": args.framework, "seed": args.seed, "epochs_cnn": args.epochs_cnn,
        "epochs_finetune": args.epochs_finetune, "cnn_images": args.cnn_images,
        "finetune_images": args.finetune_images, "test_images": len(x_test),
        "test_draws": args.test_draws, "data": source, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "phase1_step_ms": regular_ms, "wall_s": wall, "malloc_tuned": malloc_tuned,
        # phase 1 and each variant (training and testing), across resumed runs
        "part_s": part_s, "resumed": store.loaded,
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
    print(f"wall time {wall / 60:.1f} min", end="")
    if store.loaded:
        print(f" (resumed {', '.join(store.loaded)}: {sum(part_s.values()) / 60:.1f} min in all)",
              end="")
    print(f"; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
