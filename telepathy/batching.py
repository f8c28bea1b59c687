"""Per-device batch by model size, with the recipe's effective batch kept by gradient accumulation.

The plan fixes a batch per model size (``conf/batch_by_size/plan.yaml``): an 8B pair
trains 2 examples per device, a 1B pair 8. A recipe states its *effective* batch
(``trainer.batch_size`` x ``trainer.grad_accum``); ``plan`` picks the per-device batch
as the largest divisor of it within the cap of the run's size class, and accumulation
makes up the rest. ``training.fit`` draws ``batch_size`` consecutive examples of one
seeded stream per micro-batch, so a step sees the same examples whatever the split: the
result does not depend on the card a job lands on. ``apply`` writes the split into the
config just before a run starts (after its id is fixed), and result.json records it.

This table is the seed's rule. A run whose method declares what stays on the device while it
trains (``method.work.train_resident``) is sized from memory instead: ``resources.batch_plan``
takes the largest split that fits (the table is for two resident models, or none declared).
"""

from __future__ import annotations

from omegaconf import open_dict

from telepathy.config import ConfigError


def _models(cfg) -> list:
    from telepathy.config import model_config, models_used

    return [model_config(cfg, entry) for entry in dict.fromkeys(models_used(cfg))]


def validate(cfg) -> None:
    """Each row: a name, max_params (a number, or null for the last row), dual/single caps >= 1 or null."""
    node = cfg.get("batch_by_size")
    if node is None or not node.get("enabled", False):
        return
    rows = list(node.get("sizes") or [])
    if not rows:
        raise ConfigError(
            "batch_by_size.sizes=[] is not allowed; allowed: a non-empty list of size rows (or batch_by_size=off)"
        )
    for i, row in enumerate(rows):
        for col in ("dual", "single"):
            cap = row.get(col)
            if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
                raise ConfigError(
                    f"batch_by_size.sizes[{i}].{col}={cap!r} is not allowed; allowed: an integer >= 1 or null (no cap)"
                )
        bound = row.get("max_params")
        if bound is None and i != len(rows) - 1:
            raise ConfigError(
                f"batch_by_size.sizes[{i}].max_params=None is not allowed; allowed: a number "
                f"(only the last row may be null: no upper bound)"
            )
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound <= 0):
            raise ConfigError(f"batch_by_size.sizes[{i}].max_params={bound!r} is not allowed; allowed: a number > 0")


def effective_batch(cfg) -> int:
    return int(cfg.trainer.batch_size) * int(cfg.trainer.get("grad_accum", 1))


def plan(cfg) -> dict:
    """{per_device, grad_accum, effective, size, column, cap} of the run ``cfg`` describes.

    Idempotent: after ``apply`` the effective batch, and so the plan, is unchanged.
    """
    effective = effective_batch(cfg)
    models = _models(cfg)
    column = "dual" if len(models) > 1 else "single"
    largest = max(float(m.num_params) for m in models)
    size, cap = None, None
    node = cfg.get("batch_by_size")
    if node is not None and node.get("enabled", False):
        for row in node.sizes:
            if row.get("max_params") is None or largest <= float(row.max_params):
                size, cap = row.name, row.get(column)
                break
    per_device = effective
    if cap is not None:
        per_device = max(d for d in range(1, min(cap, effective) + 1) if effective % d == 0)
    return {
        "per_device": per_device,
        "grad_accum": effective // per_device,
        "effective": effective,
        "size": size,
        "column": column,
        "cap": cap,
        "largest_model_params": largest,
    }


def apply(cfg, out: dict | None = None) -> dict:
    """Set ``trainer.batch_size`` (per device) and ``trainer.grad_accum`` from ``out`` (default ``plan``,
    the table; runs pass ``resources.batch_plan``, which sizes it from memory); return the plan."""
    out = out or plan(cfg)
    with open_dict(cfg):
        cfg.trainer.batch_size = out["per_device"]
        cfg.trainer.grad_accum = out["grad_accum"]
    return out


def describe(out: dict) -> str:
    return (
        f"per-device batch {out['per_device']} x accumulation {out['grad_accum']} = effective "
        f"{out['effective']} ({out['size'] or 'no'} size class, {out['column']}-model cap {out['cap']})"
    )


__all__ = ["apply", "describe", "effective_batch", "plan", "validate"]
