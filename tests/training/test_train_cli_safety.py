"""`dclgan train` protects runs and answers mistakes with one line: the folder given is the run, a new run
never starts over an old one, damaged files and divergence are reported, impossible settings are refused."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_config
from training.config import DataConfig, ModelConfig
from training.train_cli import main
from training.trainer import Trainer, TrainingDiverged


def tiny_args(dataroot: Path, checkpoints: Path, *extra: str, name: str = "run") -> list[str]:
    return [
        "--dataroot", str(dataroot), "--checkpoints-dir", str(checkpoints), "--name", name,
        "--ngf", "4", "--ndf", "4", "--n-blocks", "1", "--netF-nc", "16", "--num-patches", "16",
        "--load-size", "36", "--crop-size", "32", "--threads", "1", "--amp", "none",
        "--n-epochs", "1", "--n-epochs-decay", "1", "--print-freq", "1", *extra,
    ]  # fmt: skip


def iteration_of(run_dir: Path) -> int:
    return torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=True)["iteration"]


@pytest.fixture
def trained(tiny_dataroot: Path, tmp_path: Path) -> Path:
    """A finished 2-iteration run at ``tmp_path/ck/run``."""
    assert main(tiny_args(tiny_dataroot, tmp_path / "ck", "--max-iters", "2")) == 0
    return tmp_path / "ck" / "run"


def test_resume_continues_the_run_in_the_folder_given_not_where_it_started(
    trained: Path, tiny_dataroot: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(trained, copy)
    before = (trained / "latest.pt").read_bytes()
    argv = ["--dataroot", str(tiny_dataroot), "--checkpoints-dir", str(copy.parent), "--name", "copy"]
    assert main([*argv, "--resume", "--max-iters", "3"]) == 0
    assert iteration_of(copy) == 3
    assert (trained / "latest.pt").read_bytes() == before  # the original run is untouched


def test_a_new_run_never_starts_over_an_existing_one(
    trained: Path, tiny_dataroot: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log_before = (trained / "metrics.jsonl").read_text()
    assert main(tiny_args(tiny_dataroot, trained.parent, "--max-iters", "1")) == 2
    assert "already holds a run" in caplog.text and "--resume" in caplog.text
    assert iteration_of(trained) == 2 and (trained / "metrics.jsonl").read_text() == log_before


def test_resume_at_max_iters_trains_no_further(trained: Path, tiny_dataroot: Path) -> None:
    argv = ["--dataroot", str(tiny_dataroot), "--checkpoints-dir", str(trained.parent), "--name", "run"]
    assert main([*argv, "--resume", "--max-iters", "2"]) == 0
    assert iteration_of(trained) == 2


@pytest.mark.parametrize("damage", [b"", b"not a checkpoint at all", "truncated"])
def test_a_damaged_checkpoint_is_one_error_line(
    trained: Path, tiny_dataroot: Path, caplog: pytest.LogCaptureFixture, damage: bytes | str
) -> None:
    latest = trained / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:200] if damage == "truncated" else damage)
    argv = ["--dataroot", str(tiny_dataroot), "--checkpoints-dir", str(trained.parent), "--name", "run"]
    assert main([*argv, "--resume"]) == 2
    assert f"{latest} cannot be read" in caplog.text


def test_a_half_written_log_line_does_not_stop_a_resume(trained: Path, tiny_dataroot: Path) -> None:
    log = trained / "metrics.jsonl"
    log.write_text(log.read_text() + '{"iteration": 3, "ep')  # a process killed mid-append
    argv = ["--dataroot", str(tiny_dataroot), "--checkpoints-dir", str(trained.parent), "--name", "run"]
    assert main([*argv, "--resume", "--max-iters", "3"]) == 0
    iterations = [json.loads(line)["iteration"] for line in log.read_text().splitlines()]
    assert iterations == [1, 2, 3]


def test_validation_cannot_be_switched_on_for_a_run_without_held_out_images(
    trained: Path, tiny_dataroot: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["--dataroot", str(tiny_dataroot), "--checkpoints-dir", str(trained.parent), "--name", "run"]
    assert main([*argv, "--resume", "--eval-every", "1"]) == 2
    assert "holds out no validation images" in caplog.text and "start a new run" in caplog.text


def test_non_finite_losses_stop_training_without_touching_the_checkpoints(
    tiny_dataroot: Path, tmp_path: Path
) -> None:
    trainer = Trainer(tiny_config(tiny_dataroot, tmp_path))
    window = {"d/a": torch.tensor(0.5), "g/nce_ab": torch.tensor(float("nan"))}
    with pytest.raises(TrainingDiverged, match="g/nce_ab became non-finite"):
        trainer._log_window(window, 1, 1.0, 0.1)
    assert not (trainer.run_dir / "latest.pt").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"print_freq": 0}, "print_freq must be >= 1"),
        ({"save_latest_freq": 0}, "save_latest_freq must be >= 1"),
        ({"max_iters": -1}, "max_iters must be >= 0"),
    ],
)
def test_settings_that_cannot_train_are_refused(
    tiny_dataroot: Path, tmp_path: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(tiny_dataroot, tmp_path, **overrides)


@pytest.mark.parametrize(
    ("config", "fields", "message"),
    [
        (ModelConfig, {"nce_t": 0.0}, "nce_T > 0"),
        (ModelConfig, {"num_patches": 0}, "num_patches must be >= 1"),
        (ModelConfig, {"nce_layers": (-1, 4)}, "layer indices >= 0"),
        (DataConfig, {"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_network_and_data_settings_that_cannot_train_are_refused(config: type, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**fields)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_a_cuda_device_without_cuda_is_one_error_line(
    tiny_dataroot: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    assert main(tiny_args(tiny_dataroot, tmp_path, "--device", "cuda", "--max-iters", "1")) == 2
    assert "no CUDA device is usable here" in caplog.text


def test_a_second_signal_stops_at_once_and_the_handlers_are_restored(tiny_dataroot: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tiny_dataroot, tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), trainer._stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of this thread
        assert trainer.stop_signal == "SIGTERM"  # the first one only asks
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted here by the second
        pytest.fail("the second signal did not stop at once")
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_checkpoint_or_validation_is_made_from_non_finite_weights(tiny_dataroot: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tiny_dataroot, tmp_path))
    trainer.run_dir.mkdir(parents=True)
    with torch.no_grad():
        next(trainer.task.gen_ab.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        trainer.save("epoch_1")
    assert not list(trainer.run_dir.iterdir())
    trainer.validator = lambda task: pytest.fail("validated NaN weights")
    with pytest.raises(TrainingDiverged):
        trainer.evaluate()


def test_a_resume_at_max_iters_does_not_validate_again(tiny_dataroot: Path, tmp_path: Path) -> None:
    from tests.training.test_train_loop import ScriptedValidator, _val_data

    cfg = tiny_config(tiny_dataroot, tmp_path, max_iters=3, eval_every=2, data=_val_data(tiny_dataroot))
    trainer = Trainer(cfg)
    trainer.validator = ScriptedValidator([0.5, 0.4])  # iteration 2, and the final weights at 3
    trainer.fit()
    resumed = Trainer(cfg, resume=True)
    resumed.validator = ScriptedValidator([])  # any call fails: nothing is left to score
    resumed.fit()
    assert resumed.iteration == 3


def test_an_error_while_training_is_not_reported_as_a_bad_setting(
    tiny_dataroot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Trainer) -> None:
        raise ValueError("a bug in the loop")

    monkeypatch.setattr(Trainer, "fit", broken)
    with pytest.raises(ValueError, match="a bug in the loop"):  # a traceback, not one line and exit 2
        main(tiny_args(tiny_dataroot, tmp_path, "--max-iters", "1"))
