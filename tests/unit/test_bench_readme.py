"""bench/README.md's table agrees with bench/results/*.json, and write_result keeps the targets' history."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from frugalray import benchmarking
from frugalray.benchmarking import git_commit, write_result

ROOT = Path(__file__).resolve().parents[2]


def load_table():
    if "bench_readme_table" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_readme_table", ROOT / "bench" / "readme_table.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass looks its module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules["bench_readme_table"]


def test_the_committed_table_is_the_one_the_results_give():
    table = load_table()
    assert (ROOT / "bench" / "README.md").read_text() == table.expected_readme(), (
        "bench/README.md disagrees with bench/results/*.json: run python bench/readme_table.py")


@pytest.fixture()
def copy(tmp_path):
    """bench/README.md and the result JSONs, copied where a test may edit them."""
    results = tmp_path / "results"
    results.mkdir()
    for path in (ROOT / "bench" / "results").glob("*.json"):
        shutil.copy(path, results / path.name)
    shutil.copy(ROOT / "bench" / "README.md", tmp_path / "README.md")
    return tmp_path


def test_an_edited_number_makes_the_readme_stale_until_regenerated(copy, capsys):
    table = load_table()
    args = ["--readme", str(copy / "README.md"), "--results-dir", str(copy / "results")]
    assert table.main([*args, "--check"]) == 0
    path = copy / "results" / "data_throughput.json"
    result = json.loads(path.read_text())
    assert result["metrics"]["speedup_vs_naive"] != 2.9
    result["metrics"]["speedup_vs_naive"] = 2.9  # still meets ">= 2.5": met stays true
    path.write_text(json.dumps(result))
    assert table.main([*args, "--check"]) == 1
    assert "`speedup_vs_naive >= 2.5`: 2.9 ✓" in capsys.readouterr().out  # the diff shows the new line
    assert table.main(args) == 0  # rewrites the table
    assert table.main([*args, "--check"]) == 0
    assert "2.9 ✓" in (copy / "README.md").read_text()


def test_a_met_flag_that_disagrees_with_its_number_is_an_error(copy):
    table = load_table()
    path = copy / "results" / "data_throughput.json"
    result = json.loads(path.read_text())
    result["metrics"]["speedup_vs_naive"] = 1.0  # fails ">= 2.5", but met still says true
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="speedup_vs_naive"):
        table.load_results(copy / "results")


def test_a_result_without_registry_entry_and_an_entry_without_result_are_errors(copy):
    table = load_table()
    (copy / "results" / "mystery_bench.json").write_text(json.dumps({"bench": "mystery_bench"}))
    (copy / "results" / "tune_compare.json").unlink()
    with pytest.raises(ValueError) as err:
        table.load_results(copy / "results")
    assert "mystery_bench" in str(err.value) and "tune_compare" in str(err.value)


def test_the_last_run_cell_says_full_quick_and_commit():
    table = load_table()
    bench = table.REGISTRY["train_value"]
    assert table.run_kind({"config": {"quick": True}}, bench) == "quick"
    assert table.run_kind({"config": {"quick": False}}, bench) == "full"
    assert table.run_kind({"config": {"mode": "full"}}, bench) == "full"
    assert table.run_kind({"config": {}}, bench) == "not recorded"
    assert table.run_kind({"config": {}}, table.REGISTRY["multinode_demo"]).startswith("full")


# -- write_result: commit and targets history ----------------------------------------------------------


def test_the_commit_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarking, "git_commit", lambda: "abc1234-dirty")
    record = write_result("demo", {}, {"x": 1.0}, {"x": ">= 1"}, out_dir=tmp_path)
    assert record["commit"] == "abc1234-dirty"
    assert json.loads((tmp_path / "demo.json").read_text())["commit"] == "abc1234-dirty"


def test_git_commit_is_head_dirty_when_code_changed_and_none_outside_git(tmp_path):
    assert git_commit(tmp_path) is None  # not a repository
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "demo.json").write_text("{}\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("not part of the tree\n")
    (tmp_path / "bench" / "results" / "demo.json").write_text('{"a": 1}\n')  # a benchmark's own output
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_an_unexplained_target_change_is_refused_and_overwrites_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the refused run's record is kept
    write_result("demo", {}, {"x": 2.0}, {"x": ">= 1"}, out_dir=tmp_path)
    before = (tmp_path / "demo.json").read_text()
    with pytest.raises(ValueError, match=r"'x': '>= 1' -> '>= 3'[\s\S]*targets_history") as err:
        write_result("demo", {}, {"x": 2.0}, {"x": ">= 3"}, out_dir=tmp_path)
    assert (tmp_path / "demo.json").read_text() == before
    kept = Path(str(err.value).rsplit("record is in ", 1)[1].rstrip("."))
    assert kept.is_relative_to(tmp_path) and kept.parent != tmp_path
    assert json.loads(kept.read_text())["targets"] == {"x": ">= 3"}  # the run's measurements are not lost
    # a target dropped is a change too
    with pytest.raises(ValueError, match=r"'x': '>= 1' -> None \(dropped\)"):
        write_result("demo", {}, {"x": 2.0, "y": 1.0}, {"y": "<= 2"}, out_dir=tmp_path)


def test_the_same_target_written_differently_and_a_new_target_need_no_history(tmp_path):
    write_result("demo", {}, {"x": 0.2}, {"x": "<= 0.30"}, out_dir=tmp_path)
    record = write_result("demo", {}, {"x": 0.2, "y": 5.0}, {"x": "<= 0.3", "y": ">= 4"}, out_dir=tmp_path)
    assert record["targets_history"] == [] and record["met"] == {"x": True, "y": True}


def test_an_explained_change_is_written_and_the_history_carried_over(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarking, "git_commit", lambda: "c0ffee1")
    write_result("demo", {}, {"x": 2.0, "y": 1.0}, {"x": ">= 1", "y": "<= 2"}, out_dir=tmp_path)
    first = {"metric": "x", "old": ">= 1", "new": ">= 3", "why": "the first run showed 1 was too easy"}
    record = write_result("demo", {}, {"x": 2.0, "y": 1.0}, {"x": ">= 3", "y": "<= 2"}, out_dir=tmp_path,
                          targets_history=[first])
    assert record["met"]["x"] is False
    assert record["targets_history"] == [{**first, "commit": "c0ffee1"}]  # commit filled in with the run's
    # a later run with no history of its own keeps the earlier history
    monkeypatch.setattr(benchmarking, "git_commit", lambda: "d00d002")
    record = write_result("demo", {}, {"x": 4.0, "y": 1.0}, {"x": ">= 3", "y": "<= 2"}, out_dir=tmp_path)
    assert record["targets_history"] == [{**first, "commit": "c0ffee1"}]
    # the next change is appended after it; the same entry passed again is not repeated
    second = {"metric": "y", "old": "<= 2", "new": None, "commit": "given", "why": "y is reported, not targeted"}
    for _ in range(2):
        record = write_result("demo", {}, {"x": 4.0, "y": 1.0}, {"x": ">= 3"}, out_dir=tmp_path,
                              targets_history=[first, second])
    on_disk = json.loads((tmp_path / "demo.json").read_text())
    assert on_disk == record
    assert on_disk["targets_history"] == [{**first, "commit": "c0ffee1"}, second]


def test_history_entries_are_checked(tmp_path):
    write_result("demo", {}, {"x": 2.0}, {"x": ">= 1"}, out_dir=tmp_path)
    wrong_new = {"metric": "x", "old": ">= 1", "new": ">= 5", "why": "stricter"}
    with pytest.raises(ValueError, match=r"targets_history\[0\].*'x'.*'>= 5'.*'>= 3'"):
        write_result("demo", {}, {"x": 2.0}, {"x": ">= 3"}, out_dir=tmp_path, targets_history=[wrong_new])
    with pytest.raises(ValueError, match="why"):  # a change needs a reason
        write_result("demo", {}, {"x": 2.0}, {"x": ">= 3"}, out_dir=tmp_path,
                     targets_history=[{"metric": "x", "old": ">= 1", "new": ">= 3", "why": " "}])
    with pytest.raises(ValueError, match="reason"):  # a typo is an error, not an ignored field
        write_result("demo", {}, {"x": 2.0}, {"x": ">= 3"}, out_dir=tmp_path,
                     targets_history=[{"metric": "x", "old": ">= 1", "new": ">= 3", "why": "w", "reason": "w"}])
    assert json.loads((tmp_path / "demo.json").read_text())["targets"] == {"x": ">= 1"}
