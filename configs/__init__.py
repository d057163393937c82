"""The Hydra config tree of every mtlib command, installed as the package ``mtlib_configs`` (see setup.py): the
commands compose from ``pkg://mtlib_configs``. Only the YAML files are configuration; this file makes the directory
importable."""
