"""Checkpoints of a scaled-MNIST run, so that a long schedule (``--full``) can stop and go on.

After phase 1 and after each variant, the run stores what it needs to skip that part later: the
trained weights (NumPy arrays), the training history and median step time, the variant's result
and the seconds the part took. ``--resume`` loads every part already stored for the same settings
and runs only the rest. Every variant is seeded on its own from the phase-1 CNN, so a resumed run
trains the same models as an uninterrupted one.

Within a part, the PyTorch training also stores its state after every epoch but the last (weights,
optimizer, random generator, running curves): a resumed run goes on from the last whole epoch and
still trains exactly what an uninterrupted run would.
"""

import hashlib
import json
import os
import pickle

# the settings that change what a part trains or how it is scored (threads change only timing)
SETTINGS = ("framework", "seed", "epochs_cnn", "epochs_finetune", "cnn_images",
            "finetune_images", "test_images", "test_draws")


class Checkpoints:
    """Parts of one run's settings under ``<out>/checkpoints/<framework>-seed<seed>-<hash>/``.

    Parameters
    ----------
    args : argparse.Namespace
        The run's arguments: the names of ``SETTINGS``, ``out`` and ``resume``.
    """

    def __init__(self, args):
        settings = {name: getattr(args, name) for name in SETTINGS}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = os.path.join(args.out, "checkpoints",
                                f"{args.framework}-seed{args.seed}-{digest}")
        self.resume = bool(args.resume)
        self.loaded = []

    def _path(self, part):
        return os.path.join(self.dir, f"{part}.pkl")

    def load(self, part):
        """The stored payload of ``part`` (a dict), or None when not resuming or not stored."""
        if not self.resume or not os.path.exists(self._path(part)):
            return None
        with open(self._path(part), "rb") as f:
            payload = pickle.load(f)
        self.loaded.append(part)
        print(f"  resumed {part} from {self._path(part)}")
        return payload

    def epochs(self, part):
        """The per-epoch store of ``part`` (an :class:`EpochState`)."""
        return EpochState(self, f"{part}.epoch")

    def save(self, part, payload):
        """Store ``payload`` (a picklable dict) for ``part``; the file appears whole or not at
        all, so a run stopped while writing leaves no broken checkpoint."""
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._path(part) + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self._path(part))


class EpochState:
    """The training state of an unfinished part after its last whole epoch.

    ``load()`` returns it (a dict) when resuming and one is stored, else None; ``save(state)``
    replaces it; ``drop()`` removes it once the part itself is stored.
    """

    def __init__(self, store, name):
        self.store, self.name = store, name

    def load(self):
        if not self.store.resume or not os.path.exists(self.store._path(self.name)):
            return None
        with open(self.store._path(self.name), "rb") as f:
            state = pickle.load(f)
        print(f"  resumed {self.name} after epoch {state['epoch']}")
        return state

    def save(self, state):
        self.store.save(self.name, state)

    def drop(self):
        if os.path.exists(self.store._path(self.name)):
            os.remove(self.store._path(self.name))
