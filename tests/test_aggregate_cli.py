"""`python -m telepathy aggregate`, `python -m telepathy report` and the plots,
on synthetic run directories with known values."""

import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

from analysis_fixtures import table_rows, write_run, write_sweep
from telepathy import analysis
from telepathy.analysis import aggregate, plots, report

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parent.parent


def run_module(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def strict_json(path):
    def no_constants(name):
        raise ValueError(f"{path} contains {name}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=no_constants)


def test_aggregate_cli_writes_tables_json_and_plots(tmp_path):
    runs = write_sweep(tmp_path / "runs")
    out = tmp_path / "summary"
    proc = run_module("telepathy", "aggregate", runs, "--out", out, "--n-boot", 500)
    assert proc.returncode == 0, proc.stderr
    # incomplete runs are reported, with their path and error type
    assert re.search(r"NOT COMPLETED \[failed\] .*sst2-bridge-c4-s3 \(OutOfMemoryError", proc.stderr)
    assert re.search(r"NOT COMPLETED \[missing\] .*sst2-bridge-c8-s3", proc.stderr)

    summary = strict_json(out / "summary.json")
    assert summary["runs"]["by_status"] == {"completed": 30, "failed": 1, "missing": 1}
    g = next(g for g in summary["groups"] if (g["task"], g["method"], g["compression"]) == ("sst2", "bridge", 4.0))
    # accuracies 30/40, 30/40, 31/40 (fixture: round((0.75 + 0.01 * seed) * 40) / 40)
    assert g["values"] == [0.75, 0.75, 0.775]
    assert g["mean"] == pytest.approx(0.758333, abs=1e-6)
    # sd = 0.0144338, t(0.975, 2) = 4.30265
    assert g["ci_half"] == pytest.approx(4.30265 * 0.0144338 / 3**0.5, rel=1e-5)
    assert g["status_counts"] == {"completed": 3, "failed": 1}
    ro = next(g for g in summary["groups"] if (g["task"], g["method"]) == ("sst2", "receiver_only"))
    assert ro["n_independent"] == 1 and ro["deterministic"] and ro["ci_low"] is None
    assert len(summary["comparisons"]) == 12 and all(c["p_holm"] is not None for c in summary["comparisons"])

    md = table_rows((out / "summary.md").read_text())
    assert ["sst2", "bridge", "4", "2.5×", "8", "75.8 ± 3.6", "3", "1 failed"] in md
    assert ["sst2", "bridge", "8", "2.5×", "8", "65.8 ± 3.6", "3", "1 missing"] in md
    assert ["sst2", "receiver_only", "", "", "", "50.0", "1 (det.)", ""] in md
    tex = (out / "summary.tex").read_text()
    assert r"sst2 & bridge & 4 & 2.5$\times$ & 8 & 75.8 $\pm$ 3.6 & 3 & 1 failed \\" in tex
    assert r"receiver\_only" in tex and tex.count(r"\begin{tabular}") == 2
    for stem in ("accuracy_vs_compression", "training_curves"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000


def test_every_table_number_comes_from_summary_json(tmp_path):
    runs = write_sweep(tmp_path / "runs")
    out = tmp_path / "summary"
    assert run_module("telepathy", "aggregate", runs, "--out", out, "--n-boot", 200).returncode == 0
    summary = strict_json(out / "summary.json")
    md = (out / "summary.md").read_text()
    for g in summary["groups"]:
        if g["n_independent"] >= 2:
            assert f"{100 * g['mean']:.1f} ± {100 * g['ci_half']:.1f}" in md


def test_default_out_is_beside_runs_not_inside(tmp_path):
    runs = write_sweep(tmp_path / "outputs" / "runs", n_items=10)
    assert run_module("telepathy", "aggregate", runs, "--n-boot", 100).returncode == 0
    assert (tmp_path / "outputs" / "summary" / "summary.json").exists() and not (runs / "summary").exists()


def test_aggregate_cli_fails_loudly_on_a_bad_glob(tmp_path):
    proc = run_module("telepathy", "aggregate", str(tmp_path / "outptus" / "*"), "--out", tmp_path / "s")
    assert proc.returncode != 0 and "no files match" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_aggregate_refuses_a_completed_run_without_the_metric(tmp_path):
    write_run(tmp_path / "runs", seed=0, metrics={"accuracy": 0.7})
    write_run(tmp_path / "runs", seed=1, metrics={"n_test": 10})
    proc = run_module("telepathy", "aggregate", tmp_path / "runs", "--out", tmp_path / "s")
    assert proc.returncode != 0 and "MissingMetricError" in proc.stderr and "s1" in proc.stderr


def test_single_seed_table_says_no_ci(tmp_path):
    write_run(tmp_path, seed=0, metrics={"accuracy": 0.7})
    s = analysis.summarise(analysis.load_runs(tmp_path))
    header, rows, notes = aggregate.metric_table(s)
    assert rows == [["sst2", "bridge", "4", "2.5×", "8", "70.0", "1 (no CI)"]]
    assert any("no CI" in n for n in notes)


def test_latency_plot_from_benchmark_records(tmp_path):
    for path, base in (("bridge", 10.0), ("text_relay", 30.0)):
        for bs in (1, 4, 16):
            for seed in (0, 1):  # shaped like benchmarks/latency.py's records: config.method is a string
                write_run(
                    tmp_path,
                    task="sst2",
                    method="latency",
                    seed=seed,
                    compression=8,
                    name=f"lat-{path}-b{bs}-s{seed}",
                    metrics={
                        "p50_ms": base * bs**0.5 + seed,
                        "p90_ms": base * bs**0.5 + 2,
                        "p99_ms": base * bs**0.5 + 5,
                        "throughput_eps": bs * 1000 / (base * bs**0.5),
                    },
                    config_extra={"method": "latency", "batch_size": bs, "path": path},
                )
    runs = analysis.load_runs(tmp_path)
    assert sorted(runs["batch_size"].unique()) == [1, 4, 16]
    fig = plots.latency(runs, tmp_path / "plots" / "latency")
    lat, thr = fig.axes
    bridge_p50 = next(l for l in lat.lines if l.get_label() == "bridge p50")
    assert list(bridge_p50.get_xdata()) == [1, 4, 16]
    assert list(bridge_p50.get_ydata()) == pytest.approx([10.5, 20.5, 40.5])  # mean over the two seeds
    assert {l.get_label() for l in thr.lines} == {"bridge", "text_relay"}
    assert set(runs["compression"]) == {8.0}
    assert (tmp_path / "plots" / "latency.png").exists() and (tmp_path / "plots" / "latency.pdf").exists()
    # a second compression factor is its own line, never averaged with the first
    write_run(
        tmp_path,
        task="sst2",
        method="latency",
        seed=0,
        compression=16,
        name="lat-bridge-c16",
        metrics={"p50_ms": 99.0, "p90_ms": 99.0, "p99_ms": 99.0, "throughput_eps": 1.0},
        config_extra={"method": "latency", "batch_size": 1, "path": "bridge", "compression": 16},
    )
    lat, _ = plots.latency(analysis.load_runs(tmp_path)).axes
    labels = {l.get_label(): l for l in lat.lines}
    assert list(labels["bridge compression=16 p50"].get_ydata()) == [99.0]
    assert list(labels["bridge compression=8 p50"].get_ydata()) == pytest.approx([10.5, 20.5, 40.5])
    # benchmark runs never enter the metric tables
    write_run(tmp_path, seed=0, metrics={"accuracy": 0.7})
    assert list(analysis.summarise(analysis.load_runs(tmp_path))["method"]) == ["bridge"]


def test_latency_plot_never_averages_runs_of_different_configs(tmp_path):
    """Two latency sweeps that differ only in relay.max_new_tokens are two lines per path, named
    by that setting; the batch size is the line's x axis, and seeds of one config are averaged."""
    for tokens, base in ((16, 10.0), (48, 30.0)):
        for bs in (1, 4):
            for seed in (0, 1):
                write_run(
                    tmp_path,
                    method="latency",
                    seed=seed,
                    compression=8,
                    name=f"lat-r{tokens}-b{bs}-s{seed}",
                    metrics={"p50_ms": base * bs + seed, "p99_ms": 99.0, "throughput_eps": 1.0},
                    config_extra={
                        "method": "latency",
                        "batch_size": bs,
                        "eval": {"batch_size": bs},
                        "path": "text_relay",
                        "relay": {"max_new_tokens": tokens},
                    },
                )
    lat, thr = plots.latency(analysis.load_runs(tmp_path)).axes
    p50 = {l.get_label(): l for l in lat.lines if l.get_label().endswith("p50")}
    assert set(p50) == {"text_relay relay.max_new_tokens=16 p50", "text_relay relay.max_new_tokens=48 p50"}
    assert list(p50["text_relay relay.max_new_tokens=16 p50"].get_ydata()) == pytest.approx([10.5, 40.5])
    assert list(p50["text_relay relay.max_new_tokens=48 p50"].get_ydata()) == pytest.approx([30.5, 120.5])
    assert len(thr.lines) == 2


def test_latency_plot_reads_a_frame_that_also_holds_training_runs(tmp_path):
    """The rehearsal aggregates runs/ and benchmarks/latency together: training records list
    run.id_exclude, latency records have none (NaN in the shared frame), and that is not an error."""
    write_run(tmp_path, name="sst2-bridge-s0", config_extra={"run": {"id_exclude": ["paths"]}})
    write_run(
        tmp_path,
        method="latency",
        compression=8,
        name="lat-b1",
        metrics={"p50_ms": 10.0, "p99_ms": 12.0, "throughput_eps": 1.0},
        config_extra={"method": "latency", "batch_size": 1, "eval": {"batch_size": 1}, "path": "bridge"},
    )
    runs = analysis.load_runs(tmp_path)
    assert runs["config.run.id_exclude"].isna().sum() == 1
    lat, _ = plots.latency(runs).axes
    assert [line.get_label() for line in lat.lines] == ["bridge p50", "bridge p99"]


def test_accuracy_plot_labels_measured_compression_and_differing_settings(tmp_path):
    """Each point carries its measured ratio (text tokens per soft token: 20 / 8 = 2.5×) beside the
    nominal x position; runs that differ in trainer.lr are two lines whose legend says so."""
    for lr, acc in ((1e-3, 0.8), (1e-4, 0.6)):
        for compression in (4, 8):
            for seed in (0, 1):
                write_run(
                    tmp_path,
                    seed=seed,
                    compression=compression,
                    metrics={"accuracy": acc + 0.01 * seed},
                    config_extra={"trainer": {"lr": lr}},
                    name=f"sst2-bridge-c{compression}-lr{lr}-s{seed}",
                )
    fig = plots.accuracy_vs_compression(analysis.summarise(analysis.load_runs(tmp_path)))
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["2.5×"] * 4  # 2 lines x 2 compression factors
    labels = sorted(l.get_label() for l in ax.lines)
    assert labels == ["bridge trainer.lr=0.0001", "bridge trainer.lr=0.001"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == labels  # one legend, under the panels
    by_label = {l.get_label(): l for l in ax.lines}
    assert list(by_label["bridge trainer.lr=0.001"].get_xdata()) == [4, 8]  # the nominal factor on x
    assert list(by_label["bridge trainer.lr=0.001"].get_ydata()) == pytest.approx([80.5, 80.5])


def test_accuracy_plot_bands_follow_the_ci(tmp_path):
    write_sweep(tmp_path)
    s = analysis.summarise(analysis.load_runs(tmp_path))
    fig = plots.accuracy_vs_compression(s)
    ax = fig.axes[[a.get_title() for a in fig.axes].index("sst2")]
    line = next(l for l in ax.lines if l.get_label() == "bridge")
    bridge = s[(s["task"] == "sst2") & (s["method"] == "bridge")].sort_values("compression")
    assert list(line.get_ydata()) == pytest.approx(list(100 * bridge["mean"]))
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(100 * bridge["ci_high"].max())
    assert band.min() == pytest.approx(100 * bridge["ci_low"].min())


def test_report_gpu_hours_sum_every_attempt_of_a_resumed_run(tmp_path):
    """A run preempted after 1 h and resumed for 0.5 h cost 1.5 h, not the last attempt's 0.5 h."""
    phase = tmp_path / "phase"
    gpu = {"gpus": 2, "cpus": 16, "mem_gb": 128, "estimate_gb": 10.0, "placement": {}}
    attempts = [
        {"status": "interrupted", "seconds": 3600.0, "gpus": 2, "end": "heartbeat"},
        {"status": "completed", "seconds": 1800.0, "gpus": 2, "end": "record"},
    ]
    write_run(phase, seed=0, resources=gpu, timing={"total_s": 1800.0, "all_attempts_s": 5400.0}, attempts=attempts)
    write_run(phase, seed=1, resources=gpu, timing={"total_s": 1800.0})  # an older record: one attempt
    md, rec = report.build_report(phase)
    by_seed = {r["run_id"]: r for r in rec["runs"]}
    assert by_seed["sst2-bridge-c4-s0"]["gpu_hours"] == pytest.approx(3.0)
    assert by_seed["sst2-bridge-c4-s0"]["attempts"] == 2 and by_seed["sst2-bridge-c4-s0"]["total_s"] == 5400.0
    assert rec["gpu_hours_total"] == pytest.approx(4.0)


def test_report_counts_failures_gpu_hours_and_checks(tmp_path):
    phase = tmp_path / "phase1"
    gpu = {"gpus": 2, "cpus": 16, "mem_gb": 128, "estimate_gb": 10.0, "placement": {}}
    for seed in (0, 1, 2):
        write_run(
            phase,
            seed=seed,
            metrics={"accuracy": 0.7 + 0.01 * seed},
            resources=gpu,
            timing={"total_s": 1800.0},
            memory={"peak_gpu_mb": 12 * 1024, "peak_rss_mb": 1024},
        )
    src = None
    for seed in (0, 1):  # a deterministic baseline: seed 1 reuses seed 0's run
        baseline = dict(method="receiver_only", compression=None, metrics={"accuracy": 0.5}, reused_from=src)
        run = write_run(phase, seed=seed, resources={**gpu, "gpus": 1}, timing={"total_s": 3600.0}, **baseline)
        src = src or run
    md, rec = report.build_report(phase)
    # 3 x 2 GPUs x 0.5 h + 1 GPU x 1 h; the reused run computed nothing
    assert rec["gpu_hours_total"] == pytest.approx(4.0)
    # 3 seeds of bridge, and a deterministic baseline counted once, pass every check
    assert all(c["passed"] for c in rec["checks"]), rec["checks"]
    assert "1 runs peaked above their estimate" not in md and "3 runs peaked above their estimate" in md

    write_run(
        phase,
        seed=3,
        metrics={},
        status="failed",
        resources=gpu,
        timing={"total_s": 60.0},
        error={"type": "OutOfMemoryError", "message": "CUDA out of memory.\nmore", "traceback": "", "oom": True},
    )
    (phase / "broken").mkdir()
    (phase / "broken" / "result.json").write_text("{")
    with pytest.warns(UserWarning):
        proc_md, rec = report.build_report(phase)
    checks = {c["check"]: c for c in rec["checks"]}
    assert not checks["all runs completed"]["passed"] and "5/7" in checks["all runs completed"]["detail"]
    assert not checks["no out-of-memory failure"]["passed"]
    assert (
        not checks["valid result.json for every run"]["passed"]
        and "broken" in checks["valid result.json for every run"]["detail"]
    )
    assert any(row[2:5] == ["OutOfMemoryError", "yes", "CUDA out of memory."] for row in table_rows(proc_md))
    # the CLI's --check turns a failed check into a non-zero exit
    proc = run_module("telepathy", "report", phase, "--check", "--out", tmp_path / "rep")
    assert proc.returncode == 1 and "## Success checks" in proc.stdout
    strict_json(tmp_path / "rep" / "report.json")


def _pixels(fig, ax, color, tol=12):
    """How many pixels inside ``ax`` are drawn in ``color`` (the rendered figure, as a reader sees it)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    box = ax.get_window_extent()
    height = image.shape[0]
    crop = image[int(height - box.y1) + 2 : int(height - box.y0) - 2, int(box.x0) + 2 : int(box.x1) - 2]
    target = np.array([round(255 * c) for c in to_rgb(color)])
    return int((np.abs(crop - target).max(axis=-1) <= tol).sum())


def _reading_order(legend):
    """A legend's entries as a reader reads them, row by row (matplotlib fills it column by column)."""
    import numpy as np

    columns = np.array_split([t.get_text() for t in legend.get_texts()], legend._ncols)
    return [str(col[r]) for r in range(len(columns[0])) for col in columns if r < len(col)]


def test_figures_keep_one_colour_per_method_clipped_bands_numeric_order_and_visible_equal_baselines(tmp_path):
    """Before: bands ran from -70% to 170%, a method changed colour between panels (the colours
    were handed out per panel), the legend read 16, 4, 8, two baselines at one value showed as one
    line, and the eval panel was in fractions while the table is in percent."""
    from matplotlib.colors import rgb_to_hsv, to_rgb

    hue = lambda c: rgb_to_hsv(to_rgb(c))[0]  # noqa: E731
    for task in ("sst2", "trec"):
        for c in (4, 8, 16):
            for seed, acc in ((0, 0.1), (1, 0.9)):  # two seeds far apart: t(0.975, 1) = 12.7, the CI spans ±400 pp
                log = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)] + [{"step": 2, "eval_accuracy": 0.75}]
                write_run(tmp_path, task, "bridge", seed, {"accuracy": acc}, compression=c, log=log)
        # trec has no linear probe: per-panel colours would give zeroshot another colour there
        for method in ("zeroshot", "linear_probe") if task == "sst2" else ("zeroshot",):
            for seed in (0, 1):  # equal values: the two baselines of sst2 are one horizontal line
                write_run(tmp_path, task, method, seed, {"accuracy": 0.5}, compression=None)
    runs = analysis.load_runs(tmp_path)
    summary = analysis.summarise(runs)
    fig = plots.accuracy_vs_compression(summary)
    for ax in fig.axes:
        (bridge,) = [line for line in ax.lines if line.get_label() == "bridge"]
        assert to_rgb(bridge.get_color()) == to_rgb(plots.PALETTE["bridge"])
        zeroshot = next(line for line in ax.lines if line.get_label() == "zeroshot")
        assert to_rgb(zeroshot.get_color()) == to_rgb(plots.PALETTE["zeroshot"]), ax.get_title()
        for band in ax.collections:  # clipped to what an accuracy can be
            y = band.get_paths()[0].vertices[:, 1]
            assert y.min() >= 0 and y.max() <= 100
        lo, hi = ax.get_ylim()
        assert -5 <= lo and hi <= 105
    sst2 = fig.axes[0]
    for method in ("zeroshot", "linear_probe"):  # both baselines at 50% stay visible: their dashes interleave
        assert _pixels(fig, sst2, plots.PALETTE[method]) > 50, method

    curves = plots.training_curves(analysis.load_logs(runs))
    (legend,) = curves.legends
    assert _reading_order(legend) == [f"bridge compression={c}" for c in (4, 8, 16)]
    loss, evals = curves.axes[:2]
    shades = [line.get_color() for line in loss.lines]
    assert {round(hue(c), 3) for c in shades} == {round(hue(plots.PALETTE["bridge"]), 3)} and len(set(shades)) == 3
    assert {tuple(line.get_ydata()) for line in evals.lines} == {(75.0,)}  # percent, as in the table
    assert evals.get_ylim()[1] <= 105 and all(float(t).is_integer() for t in evals.get_xticks())

    for path in ("bridge", "text_relay", "direct"):
        for c in (16, 4):
            write_run(
                tmp_path,
                method="latency",
                compression=c,
                name=f"lat-{path}-c{c}",
                metrics={"p50_ms": 10.0 * c, "p99_ms": 12.0 * c, "throughput_eps": 1.0},
                config_extra={"method": "latency", "batch_size": 1, "path": path, "compression": c},
            )
    lat_fig = plots.latency(analysis.load_runs(tmp_path))
    lines = {line.get_label(): line for line in lat_fig.axes[1].lines}
    order = [f"{path} compression={c}" for path in ("bridge", "direct", "text_relay") for c in (4, 16)]
    assert _reading_order(lat_fig.legends[0]) == order
    for path, method in (("bridge", "bridge"), ("text_relay", "text_relay"), ("direct", "zeroshot")):
        assert round(hue(lines[f"{path} compression=4"].get_color()), 3) == round(hue(plots.PALETTE[method]), 3)


def test_every_plot_labels_each_setting_of_a_method(tmp_path):
    """Issue 21 §5: two learning rates of the bridge were drawn in one colour under one label in
    training_curves.png; each setting is its own labelled line now (and its own point in the accuracy plot)."""
    from telepathy.analysis import aggregate

    for lr, acc in ((1e-3, 0.8), (2e-4, 0.6)):
        for seed in (0, 1):
            write_run(
                tmp_path,
                seed=seed,
                metrics={"accuracy": acc},
                config_extra={"trainer": {"lr": lr}},
                name=f"lr{lr}-s{seed}",
                log=[{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "eval_accuracy": acc}],
            )
    result = aggregate.build(tmp_path, n_boot=100)
    (legend,) = plots.training_curves(result["logs"]).legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert sorted(labels) == ["bridge trainer.lr=0.0002", "bridge trainer.lr=0.001"], labels
    (legend,) = plots.accuracy_vs_compression(result["summary"]).legends
    assert {"bridge trainer.lr=0.0002", "bridge trainer.lr=0.001"} <= {t.get_text() for t in legend.get_texts()}
