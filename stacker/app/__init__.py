"""What people run: the command line, its options, the recipes' shared code, reports, the cache inventory.

- :mod:`~stacker.app.cli`: the ``stacker`` command (fit, predict, evaluate, submit, extract, top5, report, cache);
- :mod:`~stacker.app.options`: every command-line option, defined once (and those the registries declare);
- :mod:`~stacker.app.recipe`: what every script in ``recipes/`` shares (options, fit, save, report);
- :mod:`~stacker.app.report`: a finished run's ``report.html`` and figures;
- :mod:`~stacker.app.evaluation`: scores on a labelled hold-out set (``stacker evaluate``);
- :mod:`~stacker.app.predictions`: per-image predictions as a sortable CSV (``--predictions``);
- :mod:`~stacker.app.inventory`: what a cache folder holds, listed and removed (``stacker cache``).
"""
