"""Watching a run: TensorBoard scalars equal to log.jsonl (and continued, not duplicated, on resume), the online
k-NN equal to `mokd-eval knn` on the saved teachers, curves drawn in the project's figure size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import mokd.cli as cli
from mokd_analysis import style
from mokd_analysis.curves import draw_curves, read_run
from mokd.core.errors import MokdError
from mokd.core.features import FeatureCache
from mokd_eval.knn_eval import run_knn
from mokd.core.pipeline import FeatureOptions, RunSettings
from mokd_train.engine import train
from mokd_train.online_knn import due
from mokd.core.tensorboard_log import DIRECTORY, scalars
from test_train_engine import small_config

pytestmark = pytest.mark.slow


def log_records(run: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == kind]


def tensorboard_series(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / DIRECTORY))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory) -> Path:
    """7 steps (epoch end at 5) with TensorBoard and the online k-NN every epoch, then resumed to 10."""
    run = tmp_path_factory.mktemp("watched")
    train(small_config(run, max_steps=7, tensorboard=True, knn_every=1))
    train(small_config(run, max_steps=10, tensorboard=True, knn_every=1))
    return run


def test_scalars_flatten_a_record_into_tags():
    record = {"kind": "step", "step": 3, "epoch": 0, "losses": {"sm1": 1.5}, "lr": {"1": 0.1, "2_thead": None},
              "warnings": ["x"], "images_per_s": 20, "flag": True, "bad": float("nan")}
    assert list(scalars(record)) == [("losses/sm1", 1.5), ("lr/1", 0.1), ("images_per_s", 20.0)]


def test_tensorboard_has_every_logged_step_once_across_the_resume(watched_run):
    steps = log_records(watched_run, "step")
    assert [record["step"] for record in steps] == list(range(1, 11))
    for tag, read in [("step/losses/sm1", lambda r: r["losses"]["sm1"]), ("step/lr/2", lambda r: r["lr"]["2"]),
                      ("step/momentum", lambda r: r["momentum"])]:
        series = tensorboard_series(watched_run, tag)
        assert [step for step, _ in series] == list(range(1, 11)), tag
        assert [value for _, value in series] == pytest.approx([read(r) for r in steps], rel=1e-6), tag
    monitor = tensorboard_series(watched_run, "epoch/monitor/teacher_entropy1")
    assert [step for step, _ in monitor] == [5, 10]


def test_online_knn_history_equals_mokd_eval_knn_on_the_saved_teachers(watched_run):
    history = json.loads((watched_run / "knn.json").read_text())["history"]
    assert [(entry["step"], entry["epoch"]) for entry in history] == [(5, 1), (7, 1), (10, 2)]  # 7: end of run 1
    offline = run_knn(watched_run / "checkpoint.pth",
                      RunSettings(data="shapes:50", image_size=16, echo=lambda message: None), ks=(20,),
                      temperature=0.07,
                      features=FeatureOptions(cache=FeatureCache(None), batch_size=64, num_workers=0, device="cpu"))
    for result in offline["results"]:
        assert history[-1][result["key"]]["top1"] == pytest.approx(result["metrics"]["knn"]["20"]["top1"])
        assert history[-1][result["key"]]["top5"] == pytest.approx(result["metrics"]["knn"]["20"]["top5"])
    knn_records = log_records(watched_run, "knn")
    assert [record["step"] for record in knn_records] == [5, 7, 10]
    assert 0 < knn_records[0]["epoch_share"] < 1 and knn_records[1]["epoch_share"] is None
    assert [value for _, value in tensorboard_series(watched_run, "knn/teacher1/top1")] == pytest.approx(
        [entry["teacher1"]["top1"] for entry in history])


def test_knn_is_due_every_n_epochs_and_after_the_last():
    assert [epoch for epoch in range(1, 8) if due(epoch, 3, 7)] == [3, 6, 7]
    assert not any(due(epoch, 0, 7) for epoch in range(1, 8))


def test_curves_overlay_runs_at_the_figure_size(watched_run, tmp_path):
    assert (watched_run / "curves.png").exists()  # drawn at the end of the run
    curves = read_run(watched_run)
    assert curves.losses["sm1"] == [(r["step"], r["losses"]["sm1"]) for r in log_records(watched_run, "step")]
    assert [step for step, _ in curves.knn["teacher2"]] == [5, 7, 10]
    result = CliRunner().invoke(cli.mokd_eval, ["curves", str(watched_run), str(watched_run),
                                                "--out-stem", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "both.png") as image:
        assert image.size == style.pixel_size(style.TEXT_WIDTH, 4.0)
    assert (tmp_path / "both.pdf").read_bytes().startswith(b"%PDF")


def test_curves_of_a_directory_without_a_log_is_a_user_error(tmp_path):
    with pytest.raises(MokdError, match="log.jsonl is missing"):
        draw_curves([tmp_path], tmp_path / "curves")


@pytest.mark.parametrize("flag, module, hint", [("--tensorboard", "torch.utils.tensorboard", "mokd[tensorboard]"),
                                                ("--slurm", "submitit", "mokd[slurm]")])
def test_a_missing_extra_is_one_line_naming_the_install(tmp_path, monkeypatch, flag, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    result = CliRunner().invoke(cli.mokd_train, ["--preset", "tiny", "--output-dir", str(tmp_path), flag])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {flag} needs the {module.split('.')[-1]} package: "
                                                   f"pip install '{hint}'"]


def test_linear_protocol_writes_its_epoch_records_to_tensorboard(tmp_path):
    from tests.eval.test_cli_supervised import run, timm_init_dino

    path = timm_init_dino(tmp_path / "dino.pth")
    out = tmp_path / "linear.json"
    run(["linear", path, "--data", "shapes:60", "--out", out, "--num-workers", "0", "--device", "cpu",
         "--epochs", "2", "--tensorboard"])
    history = json.loads(out.read_text())["results"][0]["protocol"]["history"]
    (board,) = {directory.parent for directory in out.parent.rglob(DIRECTORY)}
    for tag in ("loss", "train_acc", "lr"):
        series = tensorboard_series(board, tag)
        assert [step for step, _ in series] == [1, 2]
        assert [value for _, value in series] == pytest.approx([record[tag] for record in history], rel=1e-6)


def test_online_knn_under_two_gloo_processes_equals_mokd_eval_knn_on_one(tmp_path):
    """Sharded extraction, gathered once: the k-NN of a 2-process run is the single-process k-NN of its teachers."""
    import dataclasses

    import torch.multiprocessing as mp
    from test_train_ddp import WORLD_SIZE, ddp_config, free_port, run_rank

    config = dataclasses.replace(ddp_config(tmp_path / "ddp"), max_steps=5, knn_every=1, curves=False)
    mp.spawn(run_rank, args=(free_port(), config), nprocs=WORLD_SIZE, join=True)
    (entry,) = json.loads((tmp_path / "ddp" / "knn.json").read_text())["history"]
    assert entry["step"] == 5
    offline = run_knn(tmp_path / "ddp" / "checkpoint.pth",
                      RunSettings(data="shapes:50", image_size=16, echo=lambda message: None), ks=(20,),
                      temperature=0.07,
                      features=FeatureOptions(cache=FeatureCache(None), batch_size=64, num_workers=0, device="cpu"))
    for result in offline["results"]:
        assert entry[result["key"]] == pytest.approx(result["metrics"]["knn"]["20"])
