"""`report`: fixture results JSONs give the expected tables (golden Markdown and CSV); missing, duplicate and
conflicting entries; empty and foreign directories."""

import json
from pathlib import Path

import pytest

from mokd_analysis.report import run_report, to_latex
from mokd.core.errors import MokdError

GOLDEN = Path(__file__).parent / "golden" / "report"
ALL_LOSSES = ["sm", "st", "cm", "ct"]


def training(mode, net, pair, losses=None, lambdas=(None, None)):
    return {"mode": mode, "net": net, "pair": pair, "losses": losses, "lambda1": lambdas[0], "lambda2": lambdas[1]}


def model(path, key, arch, info, metrics, **extra):
    return {"key": key, "arch": arch, "checkpoint": {"path": path, "sha256": "0" * 64, "format": "mokd",
                                                     "training": info}, "metrics": metrics, **extra}


def write(directory: Path, name: str, command: str, results, created: str, protocol=None, data="imagenet", **extra):
    protocol = {"name": command, "paper": True, "differs": [], **(protocol or {})}  # the paper's unless told
    payload = {"schema_version": 1, "command": command, "created": created, "protocol": protocol,
               "dataset": {"spec": f"imagefolder:/data/{data}"}, "seed": 0, "results": results, "timings": {},
               "config": {}, "environment": {}, **extra}
    path = directory / command / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def knn(top1, best_k=20):
    return {"knn": {str(best_k): {"top1": top1, "top5": 90.0}, "200": {"top1": top1 - 1, "top5": 89.0}}}


def top1(metric, value):
    return {metric: {"top1": value, "top5": 95.0}}


def fixture_results(root: Path) -> Path:
    """A results folder as the paper's runs would leave it (values from the paper's tables)."""
    mokd = training("mokd", 1, ["r50", "vit_s"], ALL_LOSSES, (0.1, 1.0))
    mokd2 = {**mokd, "net": 2}
    ind = training("independent", 1, ["r50", "vit_s"], ["sm"])
    ind2 = {**ind, "net": 2}
    r18 = training("mokd", 1, ["r50", "r18"], ALL_LOSSES, (1.0, 0.1))
    r18_2 = {**r18, "net": 2}
    single = training("independent", None, None)
    ablation = training("mokd", 1, ["r50", "vit_s"], ["sm", "cm"], (0.1, 1.0))
    ablation2 = {**ablation, "net": 2}
    lam = training("mokd", 1, ["r50", "vit_s"], ALL_LOSSES, (0.5, 1.0))

    write(root, "mokd", "knn", [model("runs/mokd.pth", "teacher1", "r50", mokd, knn(67.1)),
                                model("runs/mokd.pth", "teacher2", "vit_s", mokd2, knn(70.8))],
          "2026-01-01T00:00:00+00:00")
    write(root, "mokd_rerun", "knn", [model("runs/mokd.pth", "teacher1", "r50", mokd, knn(67.3)),
                                      model("runs/mokd.pth", "teacher2", "vit_s", mokd2, knn(70.8))],
          "2026-01-02T00:00:00+00:00")  # a newer run: Net1 conflicts, Net2 is a harmless duplicate
    write(root, "ind", "knn", [model("runs/ind.pth", "teacher1", "r50", ind, knn(62.8)),
                               model("runs/ind.pth", "teacher2", "vit_s", ind2, knn(69.9))], "2026-01-01T00:00:00+00:00")
    write(root, "mokd", "linear", [model("runs/mokd.pth", "teacher1", "r50", mokd, top1("linear", 74.1)),
                                   model("runs/mokd.pth", "teacher2", "vit_s", mokd2, top1("linear", 74.4))],
          "2026-01-01T00:00:00+00:00")
    write(root, "ind", "linear", [model("runs/ind.pth", "teacher1", "r50", ind, top1("linear", 72.1))],
          "2026-01-01T00:00:00+00:00")  # Net2 never probed: "–"
    write(root, "r50r18", "knn", [model("runs/r50r18.pth", "teacher1", "r50", r18, knn(62.7)),
                                  model("runs/r50r18.pth", "teacher2", "r18", r18_2, knn(57.1))],
          "2026-01-01T00:00:00+00:00")
    write(root, "dino_r18", "knn", [model("runs/dino_r18.pth", "teacher", "r18", single, knn(53.2))],
          "2026-01-01T00:00:00+00:00")  # fills Independent Net2 of R50/R18 (marked †)
    write(root, "mokd_1pc", "semisup", [model("runs/mokd.pth", "teacher1", "r50", mokd, top1("semisup", 53.8)),
                                        model("runs/mokd.pth", "teacher2", "vit_s", mokd2, top1("semisup", 44.9))],
          "2026-01-01T00:00:00+00:00", protocol={"name": "semisup", "percent": 1})
    write(root, "mokd_c10", "cifar", [model("runs/mokd.pth", "teacher1", "r50", mokd, top1("cifar", 97.6)),
                                      model("runs/mokd.pth", "teacher2", "vit_s", mokd2, top1("cifar", 98.7))],
          "2026-01-01T00:00:00+00:00", protocol={"name": "cifar", "dataset": "cifar10"})
    coco = {"coco": {"bbox": {"AP": 40.3, "AP50": 59.7, "AP75": 43.7, "APs": 20.0, "APm": 40.0, "APl": 50.0},
                     "segm": {"AP": 34.9, "AP50": 56.5, "AP75": 37.1, "APs": 15.0, "APm": 35.0, "APl": 45.0}}}
    r34 = training("mokd", 2, ["r50", "r34"], ALL_LOSSES, (1.0, 0.1))
    write(root, "r34", "coco", [model("runs/r50r34.pth", "teacher2", "r34", r34, coco)], "2026-01-01T00:00:00+00:00")
    write(root, "ablation", "linear", [model("runs/abl.pth", "teacher1", "r50", ablation, top1("linear", 87.2)),
                                       model("runs/abl.pth", "teacher2", "vit_s", ablation2, top1("linear", 82.6))],
          "2026-01-01T00:00:00+00:00", data="in100")
    write(root, "lambda", "linear", [model("runs/lam.pth", "teacher1", "r50", lam, top1("linear", 87.9))],
          "2026-01-01T00:00:00+00:00", data="in100")
    stats = {"agreement": 0.901, "accuracy_a": 0.671, "accuracy_b": 0.708, "independent_errors_agreement": 0.52,
             "cohen_kappa": 0.85}
    control = {**stats, "agreement": 0.9, "accuracy_a": 0.675}
    write(root, "mokd", "consistency",
          [model("runs/mokd.pth", "teacher1", "r50", mokd, knn(67.1)),
           model("runs/mokd.pth", "teacher2", "vit_s", mokd2, knn(70.8)),
           model("runs/dino_r50.pth", "teacher", "r50", single, knn(67.5))],
          "2026-01-01T00:00:00+00:00", data="in100", consistency={"pair": stats, "control": control})
    (root / "notes.json").write_text('{"not": "a results file"}')  # foreign files are ignored
    return root


@pytest.fixture
def report(tmp_path):
    results = fixture_results(tmp_path / "results")
    payload = run_report(results, tmp_path / "report", echo=lambda message: None)
    return tmp_path / "report", payload


@pytest.mark.parametrize("table", ["table1", "table4", "table5", "table6", "table7", "table8", "table9", "all"])
def test_tables_match_the_golden_files(report, table):
    out, _ = report
    for ext in ("md", "csv"):
        assert (out / "tables" / f"{table}.{ext}").read_text() == (GOLDEN / f"{table}.{ext}").read_text(), (table, ext)


def test_conflicts_are_reported_with_the_newest_marked(report):
    out, payload = report
    conflicts = payload["report"]["conflicts"]
    assert len(conflicts) == 1  # the re-run's k-NN of MOKD Net1, wherever that number appears
    first = conflicts[0]
    assert first["tables"] == ["table1", "table7", "table8", "all"]
    assert first["column"] == "k-NN MOKD Net1" and first["shown"] == "67.3"
    assert [v["value"] for v in first["values"]] == ["67.1", "67.3"]
    text = (out / "report.md").read_text()
    assert "## Conflicts" in text and "67.3*" in text and "67.1 (" in text


def test_missing_cells_are_dashes_and_fallbacks_are_marked(report):
    out, _ = report
    table1 = (out / "tables" / "table1.csv").read_text().splitlines()
    r50_vits = next(line for line in table1 if line.startswith("R50,ViT-S"))
    assert r50_vits.split(",")[8] == "–"  # Linear Independent Net2 was never measured
    r50_r18 = next(line for line in table1 if line.startswith("R50,R18"))
    assert r50_r18.split(",")[4] == "53.2†"


def test_latex_uses_booktabs_and_escapes():
    from mokd_analysis.report import Table

    text = to_latex(Table("t", "T", ["Net1", "a_b %"], [["R50", "–"]]))
    assert "\\toprule" in text and "\\midrule" in text and "\\bottomrule" in text
    assert "a\\_b \\%" in text and "R50 & --" in text


def test_off_protocol_results_stay_out_of_the_paper_tables(tmp_path):
    """One on-protocol result per command and several that are not: each lands where issue 17 says."""
    root = tmp_path / "results"
    mokd = training("mokd", 1, ["r50", "vit_s"], ALL_LOSSES, (0.1, 1.0))
    r34 = training("mokd", 2, ["r50", "r34"], ALL_LOSSES, (1.0, 0.1))
    off = {"paper": False}
    write(root, "paper", "linear", [model("runs/mokd.pth", "teacher1", "r50", mokd, top1("linear", 74.1))],
          "2026-01-01T00:00:00+00:00")
    write(root, "cached", "linear", [model("runs/mokd.pth", "teacher1", "r50", mokd, top1("linear", 70.5))],
          "2026-01-02T00:00:00+00:00", protocol={**off, "mode": "cached", "differs": ["augmentation", "mode"]})
    write(root, "frozen", "semisup", [model("runs/mokd.pth", "teacher1", "r50", mokd, top1("semisup", 40.0))],
          "2026-01-01T00:00:00+00:00", protocol={**off, "percent": 1, "mode": "linear", "differs": ["mode"]})
    coco = {"coco": {"bbox": {"AP": 38.0}, "segm": {"AP": 33.0}}}
    write(root, "r34_1x", "coco", [model("runs/r50r34.pth", "teacher2", "r34", r34, coco)],
          "2026-01-01T00:00:00+00:00", protocol={**off, "differs": ["iters", "res5_head"]})
    old = write(root, "old", "knn", [model("runs/mokd.pth", "teacher1", "r50", mokd, knn(60.0))],
                "2026-01-01T00:00:00+00:00")
    stale = json.loads(old.read_text())
    del stale["protocol"]["paper"]  # written before protocols were recorded
    old.write_text(json.dumps(stale))

    payload = run_report(root, tmp_path / "report", echo=lambda message: None)
    tables = payload["report"]["tables"]
    (row,) = tables["table1"]["rows"]
    assert row[:3] == ["R50", "ViT-S", "imagenet"] and row[3 + 4 + 2] == "74.1"  # Linear MOKD Net1, paper's only
    assert row[3 + 2] == "–"  # k-NN MOKD Net1: the only k-NN result recorded no protocol
    assert tables["table4"]["rows"] == [] and tables["table6"]["rows"] == []
    assert [r[1:] for r in tables["all"]["rows"]] == [
        ["R50", "MOKD", "imagenet", "–", "74.1", "–", "–", "–", "–"]]
    assert tables["offprotocol"]["headers"][-1] == "Differs from the paper in"
    assert sorted(r[4:] for r in tables["offprotocol"]["rows"]) == [
        ["COCO APb / APm", "38.0 / 33.0", "iters, res5_head"],
        ["Linear, cached features", "70.5", "augmentation, mode"],
        ["Semi-sup 1%, frozen linear probe", "40.0", "mode"],
        ["k-NN", "60.0", "protocol not recorded (written before protocols were)"]]
    assert "## Off-protocol results" in (tmp_path / "report" / "report.md").read_text()


def test_broken_files_are_named_and_fail_a_strict_report(tmp_path):
    root = tmp_path / "results"
    mokd = training("mokd", 1, ["r50", "vit_s"], ALL_LOSSES, (0.1, 1.0))
    good = write(root, "good", "knn", [model("runs/mokd.pth", "teacher1", "r50", mokd, knn(67.1))],
                 "2026-01-01T00:00:00+00:00")
    (root / "truncated.json").write_text(good.read_text()[:100])
    wrong = json.loads(good.read_text())
    wrong["results"][0]["metrics"] = [1, 2]
    (root / "wrong.json").write_text(json.dumps(wrong))
    (root / "notes.json").write_text('{"not": "ours"}')
    messages = []
    payload = run_report(root, tmp_path / "report", echo=messages.append)
    skipped = {Path(item["path"]).name: item for item in payload["report"]["skipped"]}
    assert set(skipped) == {"truncated.json", "wrong.json", "notes.json"}
    assert skipped["truncated.json"]["broken"] and "not valid JSON" in skipped["truncated.json"]["reason"]
    assert skipped["wrong.json"]["broken"] and "results[0] has no 'metrics' object" in skipped["wrong.json"]["reason"]
    assert not skipped["notes.json"]["broken"] and skipped["notes.json"]["reason"] == "not a mokd results file"
    assert sum(message.startswith("skipped ") for message in messages) == 3
    assert payload["report"]["tables"]["table1"]["rows"][0][5] == "67.1"  # the good file is still used
    with pytest.raises(MokdError, match="--strict: 2 broken results file"):
        run_report(root, tmp_path / "strict", strict=True, echo=lambda message: None)
    assert not (tmp_path / "strict").exists()


def test_an_empty_directory_is_refused(tmp_path):
    with pytest.raises(MokdError, match="no JSON files"):
        run_report(tmp_path, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_a_foreign_directory_is_refused(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.json").write_text("not json")
    with pytest.raises(MokdError, match="2 JSON file"):
        run_report(tmp_path, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_model_record_says_how_each_format_was_trained(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec):
    from mokd.core.checkpoints import load_backbones
    from mokd.core.pipeline import model_record

    official, _ = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    records = [model_record(entry)["checkpoint"]["training"] for entry in load_backbones(official)]
    assert [(r["mode"], r["net"], r["pair"]) for r in records] == [
        ("mokd", 1, [tiny_cnn_spec.name, tiny_vit_spec.name]), ("mokd", 2, [tiny_cnn_spec.name, tiny_vit_spec.name])]
    dino, _ = checkpoint_factory.dino(tiny_cnn_spec)
    (single,) = [model_record(entry)["checkpoint"]["training"] for entry in load_backbones(dino)]
    assert single["mode"] == "independent" and single["pair"] is None


def native_trained(factory, cnn_spec, vit_spec, tmp_path):
    """A mokd checkpoint whose stored config names its mode, loss terms and lambdas, as the trainer writes it."""
    import torch

    path, _ = factory.mokd_native(cnn_spec, vit_spec, name="trained.pth")
    state = torch.load(path, weights_only=True)
    state["mode"] = "mokd"
    state["config"] = {"mode": "mokd", "losses": ["sm", "cm"], "lambda1": 0.1, "lambda2": 1.0}
    torch.save(state, path)
    return path


def test_report_reads_the_training_config_from_the_checkpoint_when_the_json_lacks_it(
        checkpoint_factory, tiny_cnn_spec, tiny_vit_spec, tmp_path):
    path = native_trained(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec, tmp_path)
    entries = [{"key": key, "arch": arch, "checkpoint": {"path": str(path), "sha256": "0" * 64, "format": "mokd"},
                "metrics": top1("linear", value)}
               for key, arch, value in (("teacher1", tiny_cnn_spec.name, 80.0), ("teacher2", tiny_vit_spec.name, 70.0))]
    write(tmp_path / "results", "trained", "linear", entries, "2026-01-01T00:00:00+00:00", data="in100")
    payload = run_report(tmp_path / "results", tmp_path / "report", echo=lambda message: None)
    (row,) = payload["report"]["tables"]["table7"]["rows"]
    assert row[2:] == ["in100", "✓", "✓", "", "", "0.1", "1", "80.0", "70.0", "–", "–"]
    assert payload["report"]["tables"]["table1"]["rows"] == []  # an ablation run is not Table 1's MOKD
