"""Results payloads carry the contract fields, and tables are readable."""

import json

from mokd.core.results import StageTimer, build_results, format_table, write_results


def test_payload_has_the_contract_fields(tmp_path):
    timer = StageTimer()
    with timer.stage("load"):
        pass
    payload = build_results(command="knn", protocol={"k": [10]}, dataset={"spec": "digits"},
                            results=[{"key": "teacher", "arch": "r18", "metrics": {"knn": {}}}],
                            timings=timer.as_dict(), seed=0, config={})
    path = write_results(tmp_path / "out.json", payload)
    data = json.loads(path.read_text())
    for field in ("command", "protocol", "dataset", "results", "timings", "seed", "environment", "config"):
        assert field in data
    assert data["results"][0]["key"] == "teacher"
    assert "torch" in data["environment"]["versions"]
    assert data["timings"]["load"] >= 0


def test_format_table_aligns_columns():
    text = format_table(["k", "top1"], [["10", 91.234], ["200", 9.5]], title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[3].endswith("91.23") and lines[4].endswith(" 9.50")
    assert len({len(line) for line in lines[1:]}) == 1
