"""Telepathy: a sender LLM's hidden states, through a trained bridge, read by a receiver LLM.

Three layers, each importing only the ones below it (tests/test_contract.py enforces it):

    cluster/    the cluster side: sweep planning and arrays, status, will-it-fit plans, costs,
                packing, SLURM preflight, job control              (imports the run core)
    analysis/   the read side: run dirs back into tables, CIs, paired tests, plots, phase
                reports                                            (imports the run core)
    the run core, everything else: what ``python train.py`` runs, and nothing above it

The run core, in the order a run meets it:

    hydra_glue  the ``${telepathy.run_dir:}`` resolver: checks before the run dir exists; one-line errors
    lifecycle   validate, find the run dir, skip / reuse / run ``method=``, write result.json on every exit
    methods/    the contract, the registry, ``RunContext``, the train-then-evaluate shell, every method
    config      shared checks, M, run ids (a leaf); batching: per-device batch by model size (the table;
                resources.batch_plan sizes a training run from its resident memory)
    models, data, features (sender states + cache), bridge (the Perceiver), prompting (how any model
    reads text and soft tokens, and how its answer is read), training (the one loop), checkpoint,
    evaluation, metrics, stats, compression (measured), results (the record), runlock, shared_runs,
    telemetry (what a run used), resources (its memory estimate), tracking (``logger=``), progress,
    fsutil (atomic writes), prepare (``python -m telepathy.prepare``: downloads for offline nodes)

``python -m telepathy <command>`` (``__main__``) runs the cluster and read-side tools.
"""
