"""``hpcsgd train``: config, the training driver, checkpoints, evaluation, metrics, progress.

Read in this order: :mod:`~hpcsgd.train.cli` (the subcommand), :mod:`~hpcsgd.train.config`
(keys, defaults, combinations), :mod:`~hpcsgd.train.checks` (component options),
:mod:`~hpcsgd.train.build` (a Run from the config), :mod:`~hpcsgd.train.loop` (the Run:
step, evaluate, checkpoint, finish), then the parts: :mod:`~hpcsgd.train.evaluate`,
:mod:`~hpcsgd.train.checkpoint`, :mod:`~hpcsgd.train.metrics`, :mod:`~hpcsgd.train.skipped`,
:mod:`~hpcsgd.train.progress`; :mod:`~hpcsgd.train.plan` is ``--dry-run``.
Recipes and schedules live in :mod:`hpcsgd.schedules`.
"""
