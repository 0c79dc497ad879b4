"""``hpcsgd launch``: run a training job under mpiexec or srun and restart it after a fault.

Modules: :mod:`~hpcsgd.launch.cli` (the subcommand and the restart loop),
:mod:`~hpcsgd.launch.attempt` (one run of the job: output, markers, ending it),
:mod:`~hpcsgd.launch.causes` (why an attempt ended, whether to restart),
:mod:`~hpcsgd.launch.markers` (the per-rank completion markers ``hpcsgd train``
writes). See docs/launch.md.
"""
