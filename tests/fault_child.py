"""A child process for the fault-injection tests: fit -> save -> load -> predict, optionally killed.

    python tests/fault_child.py CONFIG DATA CACHE OUT RESULT [KILL_POINT]

CONFIG is ``frozen`` (two tiny learners, a dense model and a logistic one, dense level 2) or
``finetune`` (one fine-tuned tiny learner). With KILL_POINT the process sends itself
SIGKILL at that point -- no cleanup, no ``finally``, exactly like ``kill -9`` or the
OOM killer -- by wrapping a function *in this script only*; the library has no test
hooks. RESULT gets the predictions and counters of a run that finished.
"""

import json
import os
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KILL_POINTS = {
    # point: (what is wrapped, on which call the process dies)
    "extract": ("h5py write", 7),          # inside the 2nd cached chunk: 5 datasets per chunk
    "head": ("DenseClassifier.fit", 2),    # base head of fold 2 (fold 1 is checkpointed)
    "finetune": ("FineTunedClassifier.fit", 2),  # fine-tuning fold 2
    "meta": ("DenseClassifier.fit", 4),    # level 2's 2nd cross-validation fold (2 folds + 2 CV)
    "save": ("save_estimator", 3),         # writing the model directory
}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    import h5py

    import stacker.ensemble
    import stacker.learners.base
    from stacker.learners.finetune import FineTunedClassifier
    from stacker.learners.dense import DenseClassifier

    target, when = KILL_POINTS[point]
    calls = [0]

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == when:
                die()
            return fn(*args, **kwargs)
        return wrapper

    if target == "h5py write":
        h5py.Dataset.__setitem__ = counting(h5py.Dataset.__setitem__)
    elif target == "DenseClassifier.fit":
        DenseClassifier.fit = counting(DenseClassifier.fit)
    elif target == "FineTunedClassifier.fit":
        FineTunedClassifier.fit = counting(FineTunedClassifier.fit)
    elif target == "save_estimator":
        original = stacker.io.model_dir.save_estimator
        saving = [False]

        def save_estimator(est, stem):
            if saving[0]:
                calls[0] += 1
                if calls[0] == when:
                    die()
            return original(est, stem)

        stacker.io.model_dir.save_estimator = stacker.learners.base.save_estimator = save_estimator
        save = stacker.ensemble.Ensemble.save

        def guarded_save(self, directory):
            saving[0] = True
            return save(self, directory)

        stacker.ensemble.Ensemble.save = guarded_save


def main(config, data_dir, cache, out, result, point=None):
    import tinynet  # noqa: F401 - registers tiny_cnn

    from stacker.data import sources as im
    from stacker.ensemble import Ensemble
    from stacker.features.extractor import forward_pass_count
    from stacker.learners.finetune import FineTunedClassifier
    from stacker.learners.dense import DenseClassifier

    fits = {"dense": 0, "finetune": 0}

    def counted(cls, kind):
        fit = cls.fit

        def wrapper(self, *a, **k):
            fits[kind] += 1
            return fit(self, *a, **k)
        cls.fit = wrapper

    counted(DenseClassifier, "dense")
    counted(FineTunedClassifier, "finetune")
    if point:
        install(point)
    weights = os.path.join(data_dir, "tiny.weights.h5")
    tiny = {"backbone": "tiny_cnn", "input_size": 32, "weights": weights}
    common = dict(cv=2, random_state=0, cache_dir=cache, verbose=0, batch_size=4, chunk_size=4)
    if config == "frozen":  # short-lived dense nets keep each child process to seconds
        ens = Ensemble([tiny, {**tiny, "input_size": 40, "models": "logistic"}], models=[DenseClassifier(epochs=15)],
                       meta=DenseClassifier(hidden=(8,), epochs=15), **common)
    else:
        ens = Ensemble([tiny], meta="logistic",
                       finetune={"blocks": 1, "epochs": 2, "head_epochs": 5, "learning_rate": 1e-3, "tta": ("original", "flip")}, **common)
    train = im.load_images(os.path.join(data_dir, "train"))
    ens.fit(train)
    fit_forward = forward_pass_count()
    ens.save(out)
    loaded = Ensemble.load(out)
    test = im.ImageSet(sorted(os.path.join(data_dir, "test", f) for f in os.listdir(os.path.join(data_dir, "test"))),
                       list(range(4)))
    proba = loaded.predict_proba(test)
    np.save(result + ".npy", proba)
    with open(result + ".json", "w") as f:
        json.dump({"forward": fit_forward, "dense_fits": fits["dense"], "finetune_fits": fits["finetune"],
                   "level2": ens.meta_.name,
                   "oof": {n: p.tolist() for n, p in ens.oof_proba_.items()},
                   "meta_oof": ens.meta_oof_proba_.tolist()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
