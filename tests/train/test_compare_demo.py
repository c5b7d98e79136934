"""`mokd-eval demo --methods`: every method and its Independent baseline, same seed and data, one table."""

import json

import pytest
from click.testing import CliRunner

from mokd.cli import mokd_eval
from mokd.core.errors import MokdError
from mokd_train import compare

pytestmark = pytest.mark.slow  # trains


@pytest.fixture
def small_compare(shrink_demo):
    shrink_demo(compare, arch2="test_vit")


def test_compare_demo_trains_each_method_and_its_baseline_with_the_same_seed(small_compare, tmp_path):
    result = CliRunner().invoke(mokd_eval, ["demo", "--methods", "mokd,dogo,mcl", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for label in ("MOKD (vs DINO)", "DoGo (vs SimCLR)", "MCL (vs MoCo v1)", "raw pixels (reference)"):
        assert label in result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(entry["method"], entry["mode"], entry["key"]) for entry in summary["results"]] == [
        (method, mode, key) for method, keys in (("mokd", ("teacher1", "teacher2")), ("dogo", ("student1", "student2")),
                                                 ("mcl", ("student1", "student2")))
        for mode in ("independent", "mokd") for key in keys]
    orders = set()
    for method in ("mokd", "dogo", "mcl"):
        for mode in ("independent", "mokd"):
            config = json.loads((tmp_path / method / mode / "config.json").read_text())
            assert (config["method"], config["mode"], config["seed"]) == (method, mode, 0)
            orders.add((config["data"], config["batch_size"], config["max_steps"], config["epochs"]))
    assert len(orders) == 1  # same data, batch and budget for every run
    table = result.output[result.output.index("k-NN top-1"):]
    row = next(line for line in table.splitlines() if line.startswith("DoGo") and "Net1" in line)
    independent, paired, delta = (float(value) for value in row.split()[-3:])
    assert delta == pytest.approx(paired - independent, abs=0.011)


def test_bad_method_lists_are_one_line_errors():
    with pytest.raises(MokdError, match="--methods takes distinct names"):
        compare.parse_methods("mokd,byol")
    result = CliRunner().invoke(mokd_eval, ["demo", "--methods", "mokd,mokd"])
    assert result.exit_code == 2 and "Traceback" not in result.output
