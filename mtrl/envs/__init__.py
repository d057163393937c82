"""Multi-task RL environments: task families (point-mass, Meta-World MT10/MT50) and their vector envs.

See :mod:`mtrl.envs.base` for the contract every family and env follows. Meta-World needs the ``rl`` extra
and is imported only when an ``mt10``/``mt50`` family is built.
"""

from mtrl.envs.base import (
    FAMILY_NAMES,
    VECTORIZATIONS,
    TaskFamily,
    flatten_obs,
    make_family,
    make_vector_env,
)
from mtrl.envs.metaworld import MT10_TASKS, MT50_TASKS, MetaWorldFamily, MetaWorldTaskEnv
from mtrl.envs.pointmass import PointMassEnv, PointMassFamily

__all__ = [
    "FAMILY_NAMES",
    "MT10_TASKS",
    "MT50_TASKS",
    "VECTORIZATIONS",
    "MetaWorldFamily",
    "MetaWorldTaskEnv",
    "PointMassEnv",
    "PointMassFamily",
    "TaskFamily",
    "flatten_obs",
    "make_family",
    "make_vector_env",
]
