"""Constants, result records and the Markdown table of the scaled-MNIST experiment (shared by the
PyTorch and Keras implementations)."""

import numpy as np

ORIGINAL = {  # felixlaumon/deform-conv README: test accuracy (%)
    "regular": {"mnist": 98.74, "scaled": 57.01},
    "deformable": {"mnist": 97.27, "scaled": 92.55},
}
# the variant that matches each of the original's rows: (a) its regular CNN, (d) its protocol
ORIGINAL_ROW = {"a": "regular", "d": "deformable"}
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


def summarize(key, plain, scaled, mean_offset, step_ms, n_trained=None):
    """The result record of variant ``key``: accuracy (%) on plain MNIST, on each scaled test
    draw (mean and sample standard deviation), mean |offset| (px, None without offsets), the
    median training step (ms) and the number of parameters its fine-tuning trained. Prints a
    one-line summary."""
    accs = np.asarray(scaled, float)
    sd = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
    print(f"  ({key}) MNIST {plain:.2f}%, scaled {accs.mean():.2f}% ± {sd:.2f}"
          + (f", mean |offset| {mean_offset:.3f} px" if mean_offset is not None else ""))
    return {"variant": VARIANTS[key], "mnist": float(plain), "scaled": accs.tolist(),
            "scaled_mean": float(accs.mean()), "scaled_sd": sd,
            "mean_offset_px": None if mean_offset is None else float(mean_offset),
            "step_ms": step_ms, "trained_parameters": n_trained}


def markdown_table(results, meta):
    lines = [
        (f"| variant | MNIST | scaled MNIST (mean ± sd, {meta['test_draws']} draws) | "
         "mean \\|offset\\| (px) | parameters fine-tuned | step (ms) | the original's (MNIST / scaled) |"),
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        off = "" if r["mean_offset_px"] is None else f"{r['mean_offset_px']:.3f}"
        step = "" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        trained = "" if r.get("trained_parameters") is None else f"{r['trained_parameters']:,}"
        orig = ORIGINAL.get(ORIGINAL_ROW.get(key))
        orig = f"{orig['mnist']}% / {orig['scaled']}%" if orig else ""
        lines.append(f"| ({key}) {VARIANTS[key]} | {r['mnist']:.2f}% | {r['scaled_mean']:.2f}% ± "
                     f"{r['scaled_sd']:.2f} | {off} | {trained} | {step} | {orig} |")
    lines += [
        "",
        ("The original (felixlaumon/deform-conv README), for comparison: regular CNN "
        f"{ORIGINAL['regular']['mnist']}% on MNIST, {ORIGINAL['regular']['scaled']}% on scaled "
        f"MNIST; deformable CNN {ORIGINAL['deformable']['mnist']}% / "
        f"{ORIGINAL['deformable']['scaled']}% (its offsets never moved: variant (b) is what it "
         "measured)."),
    ]
    return "\n".join(lines)
