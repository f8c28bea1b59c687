"""The cluster side: what a job needs, how a sweep is planned and launched, and what is running.

    resources  GPU-memory estimate per run and the SLURM request it implies
    sweep      a sweep's planned jobs, their grouping into arrays, and the jobs.json manifest
    status     ``python -m telepathy status``: queued / running / completed / failed per run

The Hydra launcher plugin (hydra_plugins/telepathy_launcher) is glue around ``sweep``.
"""
