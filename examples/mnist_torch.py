"""The PyTorch side of the scaled-MNIST experiment: training, evaluation and the variants.

The primitives that scaled_mnist.py's driver runs the protocol with (phase 1, each variant's
fine-tuning, evaluation, weights to store); see scaled_mnist.py for the protocol.
"""

import copy
import time

import mnist_data
import mnist_models
import numpy as np
import torch
import torch.nn.functional as F
from scaled_mnist_results import BATCH, EVAL_BATCH, LR_CNN, LR_FINETUNE
from tqdm import tqdm


def _freeze_all_but(model, params):
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if id(p) in keep]


def train(model, params, images, labels, *, epochs, images_per_epoch, lr, bn_train, scale, rng,
          desc, epoch_state=None):
    """Adam on ``params`` only (everything else frozen); returns the history and step times.

    ``bn_train`` False keeps BatchNorm in eval mode (running statistics frozen); ``scale`` draws
    a fresh scaled version of the epoch's images. ``epoch_state`` (an ``EpochState`` of
    mnist_checkpoints, optional) stores the state after every epoch but the last and, when one
    is stored, goes on from it; the result then equals an uninterrupted run's, and its
    ``earlier_s`` holds the seconds the earlier runs spent.
    """
    t_start = time.perf_counter()
    params = _freeze_all_but(model, params)
    opt = torch.optim.Adam(params, lr)
    history, step_s = [], []
    seen, run_loss, run_acc, first, earlier_s = 0, None, None, 0, 0.0
    state = epoch_state.load() if epoch_state is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        history, step_s, seen, run_loss, run_acc = (state[k] for k in (
            "history", "step_s", "seen", "run_loss", "run_acc"))
        first, earlier_s = state["epoch"], state["seconds"]
    for epoch in range(first, epochs):
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
        if epoch_state is not None and epoch + 1 < epochs:
            epoch_state.save({
                "epoch": epoch + 1, "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()), "rng": rng.bit_generator.state,
                "history": history, "step_s": step_s, "seen": seen, "run_loss": run_loss,
                "run_acc": run_acc, "seconds": earlier_s + time.perf_counter() - t_start})
    # the median step, skipping the first steps (JIT compilation, allocator warm-up)
    steady = step_s[min(20, len(step_s) // 2):]
    return {"history": history, "step_ms": 1e3 * float(np.median(steady)) if steady else None,
            "earlier_s": earlier_s}


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


def set_threads(threads):
    torch.set_num_threads(threads)


def seed(value):
    torch.manual_seed(value)


def new_cnn():
    return mnist_models.CNN()


def train_cnn(cnn, images, labels, args, rng, epoch_state=None):
    """Phase 1: the whole CNN on plain images; returns the history and median step time."""
    return train(cnn, list(cnn.parameters()), images, labels, epochs=args.epochs_cnn,
                 images_per_epoch=args.cnn_images, lr=LR_CNN, bn_train=True, scale=False,
                 rng=rng, desc="phase 1", epoch_state=epoch_state)


def variant_model(key, cnn):
    """The untrained fine-tuning model of ``key`` (to load stored weights into)."""
    return finetune_setup(key, cnn)[0]


def finetune(key, cnn, images, labels, args, rng, epoch_state=None):
    """Phase 2 of variant ``key`` on scaled images; returns (model, history and median step
    time, number of parameters trained)."""
    model, params, bn_train = finetune_setup(key, cnn)
    run = train(model, params, images, labels, epochs=args.epochs_finetune,
                images_per_epoch=args.finetune_images, lr=LR_FINETUNE, bn_train=bn_train,
                scale=True, rng=rng, desc=f"({key})", epoch_state=epoch_state)
    return model, run, sum(p.numel() for p in params)


def get_weights(model):
    """Every parameter and buffer (BatchNorm statistics included) as NumPy arrays."""
    return {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}


def set_weights(model, weights):
    model.load_state_dict({name: torch.from_numpy(a) for name, a in weights.items()})
