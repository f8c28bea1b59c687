"""The cluster side: how a sweep is planned and launched, what is running, and whether a plan fits.

    sweep      a sweep's planned jobs, their grouping into arrays, and the jobs.json manifest
    packing    small runs share a GPU: several runs in one SLURM job
    preflight  every array's request against ``sinfo`` before the first ``sbatch``
    status     ``python -m telepathy status``: queued / running / completed / failed per run;
               the multirun summary (``MultirunSummary``, a Hydra callback of conf/train.yaml)
    checklist  ``status --plan``: the plan against what ran, and the plan's success metrics
    costs      how long a run takes on a device and how busy it keeps it, from the work its method declares
               (FLOPs, bytes and calls per stage, per-op dispatch; calibrated by finished runs)
    plan       ``python -m telepathy plan``: predict, schedule, and say whether the plan fits
    control    ``python -m telepathy control``: hold, release or cancel a phase's jobs

It imports the run core (a job's memory estimate is ``telepathy.resources``, its record
``telepathy.results``); the run core never imports it. The Hydra launcher plugin
(hydra_plugins/telepathy_launcher) is glue around ``sweep``.
"""
