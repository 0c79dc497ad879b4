"""``hpcsgd train``: config, training loop, checkpoints, evaluation, metrics, progress.

Modules: :mod:`~hpcsgd.train.cli` (the subcommand), :mod:`~hpcsgd.train.config`
(schema and validation), :mod:`~hpcsgd.train.loop` (the loop, top to bottom),
:mod:`~hpcsgd.train.checkpoint`, :mod:`~hpcsgd.train.evaluate`,
:mod:`~hpcsgd.train.metrics`, :mod:`~hpcsgd.train.progress`.
"""
