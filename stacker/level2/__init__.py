"""Level 2: combining the base learners' out-of-fold probabilities into the ensemble's.

- :mod:`~stacker.level2.arrays`: the stacked input matrix, rows a block at a time, aligned columns, :func:`score`.
- :mod:`~stacker.level2.registry`: which combiners exist (``@register_combiner``), their names, help and meaning.
- :mod:`~stacker.level2.combiners`: the built-in combiners (greedy, logit, mean, best, stack2, dense, logistic).
- :mod:`~stacker.level2.calibration`: the temperature and floor applied after the combiner.
- :mod:`~stacker.level2.crossfit`: a combiner's and a calibration's outputs out of fold.
- :mod:`~stacker.level2.selection`: :func:`fit_level2` picks among candidates out of fold; :class:`Level2`.
- :mod:`~stacker.level2.importance`: how much level 2 relies on each learner (permutation importance).
- :mod:`~stacker.level2.leaderboard`: the out-of-fold leaderboard as text.

Importing the package registers the built-in combiners, so every name is known wherever
any of its modules is used.
"""

from stacker.level2 import combiners as _combiners  # noqa: F401 - registers the built-in combiners
