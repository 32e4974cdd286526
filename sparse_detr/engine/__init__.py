"""What runs the models, by job: ``training`` (the loop, evaluation, optimizer, data loaders from a config,
fine-tuning), ``inference`` (loading, ``Predictor``, predict, visualize, export, selection inspector) and
``studies`` (sweep, benchmark, their reports, checkpoint conversion), over the shared runtime in this package
(checkpoints, atomic writes, distributed helpers, logs, progress and timing, the tools' error handling).
Imports go one way: this package ← ``inference`` ← ``training`` ← ``studies``."""
