"""The scaled-MNIST example's mid-part resume, run the same way for torch and Keras: an
uninterrupted fine-tuning, then one stopped right after storing its first epoch and resumed
into a model with other weights (the tests compare the two)."""

import argparse

import pytest


class _StopAfterFirstSave(Exception):
    pass


def resume_args(tmp_path, framework):
    """Settings of a tiny fine-tuning: 3 epochs of 64 images, checkpoints under tmp_path."""
    return argparse.Namespace(
        framework=framework, seed=0, epochs_cnn=1, epochs_finetune=3, cnn_images=0,
        finetune_images=64, test_images=0, test_draws=0, out=str(tmp_path), resume=True)


def whole_and_resumed(args, finetune):
    """``(whole, resumed, epoch_state)``: the results of ``finetune(epoch_state, init_seed)``
    (a framework's ``finetune`` of variant (d): ``(model, run, n_trained)``) without a stop,
    and stopped after epoch 1 then resumed from a model initialised with another seed."""
    from mnist_checkpoints import Checkpoints, EpochState

    whole = finetune(None, 0)

    class StopAfterSave(EpochState):
        def save(self, state):
            super().save(state)
            raise _StopAfterFirstSave

    store = Checkpoints(args)
    with pytest.raises(_StopAfterFirstSave):
        finetune(StopAfterSave(store, "variant_d.epoch"), 0)
    epoch_state = store.epochs("variant_d")
    assert epoch_state.load()["epoch"] == 1
    resumed = finetune(epoch_state, 1)
    assert resumed[1]["earlier_s"] > 0 and whole[1]["earlier_s"] == 0
    return whole, resumed, epoch_state
