"""The job's runtime around training: ranks and nodes, the collective watchdog, abort, timeline.

* :mod:`~hpcsgd.runtime.topology`: node-local and inter-node communicators, virtual nodes, GPU per rank;
* :mod:`~hpcsgd.runtime.watchdog`: names the collective and the ranks that did not arrive;
* :mod:`~hpcsgd.runtime.abort`: an exception on one rank ends the whole job;
* :mod:`~hpcsgd.runtime.trace`: per-phase timings and the Chrome-trace timeline;
* :mod:`~hpcsgd.runtime.envvars`: one parser for the numeric environment variables.
"""
