"""Level 1: base learners, each one feature source times one model, bagged over the shared folds.

- :mod:`~stacker.learners.base`: the :class:`Learner` every kind extends (folds, checkpoints, cache, save/load);
- :mod:`~stacker.learners.kinds`: the registry of learner kinds and the specs an ensemble's parameters make;
- :mod:`~stacker.learners.frozen`: the default kind, a zoo model on a frozen backbone's pooled features;
- :mod:`~stacker.learners.finetuned`: the fine-tuned kind (its options and command-line group);
- :mod:`~stacker.learners.finetune`: the fine-tuned network, trained in two phases on cut-point rows;
- :mod:`~stacker.learners.zoo`: the named models (logistic, prototype, dense, resnet) and presets;
- :mod:`~stacker.learners.dense`: the Keras dense head;
- :mod:`~stacker.learners.streaming`: out-of-core versions of the zoo's models;
- :mod:`~stacker.learners.fastpath`: probabilities of known fold models without per-call checks;
- :mod:`~stacker.learners.keras_fit`: Keras fits that leave no global state behind;
- :mod:`~stacker.learners.memory`: freed memory goes back to the system during long fits;
- :mod:`~stacker.learners.distributed`: Ray as the executor of extraction and fold fits.

Importing the package registers the built-in kinds.
"""

from stacker.learners import finetuned, frozen  # noqa: F401 - registers the built-in learner kinds
