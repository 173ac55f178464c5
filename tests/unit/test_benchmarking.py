import json

import pytest
from frugalray.benchmarking import target_met, write_result


@pytest.mark.parametrize(
    "value,target,expected",
    [(2.6, ">= 2.5", True), (2.4, ">= 2.5", False), (0.2, "<= 0.2", True), (0.21, "<= 0.2", False),
     (None, ">= 1", False), (1.0, "> 1", False)],
)
def test_target_met(value, target, expected):
    assert target_met(value, target) is expected


def test_target_with_unknown_operator_is_an_error():
    with pytest.raises(ValueError, match="op"):
        target_met(1.0, "~ 1")


def test_write_result_computes_met_from_metrics(tmp_path):
    record = write_result("demo", {"mode": "quick"}, {"speedup": 3.0, "error": 0.5},
                          {"speedup": ">= 2.5", "error": "<= 0.15"}, out_dir=tmp_path)
    on_disk = json.loads((tmp_path / "demo.json").read_text())
    assert on_disk == record
    assert on_disk["met"] == {"speedup": True, "error": False}
    assert set(on_disk) == {"bench", "date", "commit", "machine", "config", "metrics", "targets", "met",
                            "targets_history"}
    # every result says how busy the shared machine was: ratios from a loaded box read differently
    assert len(on_disk["machine"]["load_average"]) == 3 and all(x >= 0 for x in on_disk["machine"]["load_average"])
