"""Hydra launcher plugin: phases as SLURM job arrays, one array per resource class.

``hydra/launcher=slurm`` and ``hydra/launcher=local`` (conf/hydra/launcher/) select
the launchers in :mod:`.launcher`; see docs/cluster.md.
"""
