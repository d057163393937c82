"""Command-line mains of mtrec: thin modules that parse a config and call library functions.

* :mod:`mtrec.cli.train`: ``mtrec-train`` (:func:`mtrec.train.train_and_evaluate`);
* :mod:`mtrec.cli.teachers`: ``mtrec-teachers`` (:func:`mtrec.train.train_teachers`);
* :mod:`mtrec.cli.export`: ``mtrec-export`` / ``mtlib-export`` (:func:`mtrec.export.export_run`);
* :mod:`mtrec.cli.group`: ``mtlib-group`` (:func:`mtrec.grouping.run_grouping`).
"""
