"""Multi-task reinforcement learning: multi-task SAC agents (MT-SAC, multi-head SAC, CARE, task-blind) on task
families (a point mass with K conflicting goals, Meta-World MT10/MT50), with the multi-task strategies of :mod:`mtl`.

Where things are, in the order they depend on each other:

* :mod:`mtrl.tasks`: task-name tables; :mod:`mtrl.metadata`: CARE's task descriptions and their embeddings.
* :mod:`mtrl.envs`: the task families and their registry (:func:`mtrl.envs.make_family`).
* :mod:`mtrl.encoders`, :mod:`mtrl.agents`: networks and the SAC agents; :mod:`mtrl.replay`: per-task replay.
* :mod:`mtrl.config`: what an ``mtrl-train`` config may hold (start-up checks) and the builders of its agent.
* :mod:`mtrl.runs`: a run directory's layout and loading; :mod:`mtrl.evaluate`: evaluation.
* :mod:`mtrl.train`: the training loop with exact resume; :mod:`mtrl.export`: the policy for serving;
  :mod:`mtrl.distill`: policy distillation from single-task teachers.
* :mod:`mtrl.cli`: the command lines ``mtrl-train`` and ``mtrl-eval``, thin Hydra mains over the above.
"""
