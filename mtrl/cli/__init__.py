"""The command lines of :mod:`mtrl`: ``mtrl-train`` (:mod:`mtrl.cli.train`) and ``mtrl-eval`` (:mod:`mtrl.cli.eval`).

Each is a thin Hydra main over ``configs/`` (installed as ``mtlib_configs``): it composes the config and calls one
library function (:func:`mtrl.train.run`, :func:`mtrl.evaluate.evaluate_run`). Configuration errors print
``program: error: ...`` and exit with status 2, without a traceback (``MTLIB_DEBUG=1`` shows it;
:class:`mtl.cli.ConfigErrorExit`). Only these modules import :mod:`mtl.cli` and Hydra's ``main``.
"""
