"""``load_runs`` names the run directory of any record it cannot read (unit tests, no models)."""

import pytest

from analysis_fixtures import write_run
from telepathy import analysis


def test_unreadable_result_json_is_a_malformed_row_naming_its_path(tmp_path):
    write_run(tmp_path, seed=0, metrics={"accuracy": 0.8})
    bad = tmp_path / "dir-instead-of-file"
    (bad / "result.json").mkdir(parents=True)  # before: IsADirectoryError escaped load_runs
    with pytest.warns(UserWarning, match="dir-instead-of-file"):
        runs = analysis.load_runs(tmp_path).set_index("run_id")
    assert runs.loc["dir-instead-of-file", "status"] == "malformed"
    assert str(bad / "result.json") in runs.loc["dir-instead-of-file", "error.message"]


def test_a_record_with_a_non_integer_seed_names_its_run_dir(tmp_path):
    write_run(tmp_path, seed=0, metrics={"accuracy": 0.8})
    # a record written before seeds were validated; before: a bare "invalid literal for int()"
    odd = write_run(tmp_path, seed="abc", metrics={"accuracy": 0.7}, name="odd-seed")
    with pytest.raises(analysis.RunReadError, match=f"cannot read run {odd}: seed='abc' is not an integer"):
        analysis.load_runs(tmp_path)
