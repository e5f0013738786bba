"""Offline RL domain: datasets, QIPO, baselines, evaluation; needs the rl extra: gymnasium[mujoco],
minari, stable-baselines3.

Nothing heavy is imported here: import the submodules (``domains.rl.datasets``,
``domains.rl.behaviour``, ...) and each loads its stack lazily, failing with a clear message when the
extra is missing.
"""
