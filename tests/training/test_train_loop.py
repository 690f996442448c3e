"""The long-run features of the training loop: validation and best.pt, SIGTERM checkpoints, --amp auto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.training.conftest import tiny_config, write_domain
from tests.training.test_trainer import LOSS_KEYS, read_log
from training import trainer as trainer_module
from training.config import DataConfig
from training.data import UnalignedDataset, split_validation
from training.trainer import Trainer, resolve_amp


def eval_lines(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("event") == "eval"]


def test_validation_images_are_held_out_of_training_and_fixed_by_seed(tiny_dataroot):
    cfg = DataConfig(dataroot=str(tiny_dataroot), load_size=36, crop_size=32, val_size=2)
    data = UnalignedDataset(cfg, seed=3)
    assert len(data.val_a) == len(data.val_b) == 2
    assert not set(data.val_a) & set(data.files_a) and not set(data.val_b) & set(data.files_b)
    assert len(data.files_a) + 2 == 6 and len(data) == 8 - 2
    again = UnalignedDataset(cfg, seed=3)
    assert again.val_a == data.val_a and again.val_b == data.val_b
    assert UnalignedDataset(cfg, seed=4).val_b != data.val_b or UnalignedDataset(cfg, seed=5).val_b != data.val_b


def test_validation_may_not_take_half_the_domain(tiny_dataroot):
    files = sorted((tiny_dataroot / "trainA").iterdir())
    with pytest.raises(ValueError, match="over half"):
        split_validation(files, 4, seed=0)


def test_eval_every_requires_a_validation_set(tiny_dataroot, tmp_path):
    with pytest.raises(ValueError, match="--val-size"):
        tiny_config(tiny_dataroot, tmp_path, eval_every=2)


class ScriptedValidator:
    """Stands in for the Inception-based validator: returns the scores it is given, in order."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        self.calls: list[torch.Tensor] = []

    def __call__(self, task):
        self.calls.append(task.gen_ab.state_dict()["model.1.weight"].clone())
        score = self.scores.pop(0)
        grid = np.zeros((8, 32, 3), np.uint8)
        return {"kid_ab": score / 2, "kid_ba": score / 2, "score": score}, grid


def test_best_checkpoint_follows_the_lowest_validation_score(tiny_dataroot, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_dataroot, tmp_path, max_iters=6, eval_every=2, data=_val_data(tiny_dataroot))
    trainer = Trainer(cfg)
    scripted = ScriptedValidator([0.5, 0.2, 0.3])
    trainer.validator = scripted
    trainer.fit()
    evals = eval_lines(trainer.run_dir)
    assert [e["iteration"] for e in evals] == [2, 4, 6]
    assert [e.get("best", False) for e in evals] == [True, True, False]
    best = torch.load(trainer.run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert best["iteration"] == 4 and best["best_score"] == pytest.approx(0.2)
    assert torch.equal(best["networks"]["G_A"]["model.1.weight"], scripted.calls[1])
    assert (trainer.run_dir / "best_net_G_A.pth").is_file()
    assert (trainer.run_dir / "samples" / "eval_0000006.png").is_file()
    # A resumed run remembers the best score: a worse evaluation does not replace best.pt.
    resumed = Trainer(tiny_config(tiny_dataroot, tmp_path, max_iters=8, eval_every=2, data=_val_data(tiny_dataroot)),
                      resume=True)
    resumed.validator = ScriptedValidator([0.25])
    resumed.fit()
    assert torch.load(trainer.run_dir / "best.pt", weights_only=True)["iteration"] == 4


@pytest.mark.parametrize(("val_side", "expected"), [(None, 32), (24, 24)])
def test_validation_translates_at_val_side_or_else_the_crop(tiny_dataroot, tmp_path, monkeypatch, val_side, expected):
    from training import validation

    sizes = []
    monkeypatch.setattr(validation, "Validator", lambda a, b, size, device, cache: sizes.append(size))
    Trainer(tiny_config(tiny_dataroot, tmp_path, eval_every=2, val_side=val_side, data=_val_data(tiny_dataroot)))
    assert sizes == [expected]


def test_val_side_keeps_the_generators_contract(tiny_dataroot, tmp_path):
    with pytest.raises(ValueError, match="val_side"):
        tiny_config(tiny_dataroot, tmp_path, eval_every=2, val_side=30, data=_val_data(tiny_dataroot))


def _val_data(root) -> DataConfig:
    return DataConfig(dataroot=str(root), load_size=36, crop_size=32, num_workers=0, val_size=2)


def test_validation_with_the_real_inception_features(tiny_dataroot, tmp_path):
    """The real path: Inception features of held-out images, cached reference features, FID/KID lines."""
    pytest.importorskip("scipy")
    from training.metrics_fid import InceptionWeightsError

    cfg = tiny_config(tiny_dataroot, tmp_path, max_iters=2, eval_every=2, data=_val_data(tiny_dataroot))
    try:
        trainer = Trainer(cfg)
    except InceptionWeightsError as exc:
        from tests.requires import unavailable

        unavailable(f"Inception weights not installed: {exc}")
    trainer.fit()
    (line,) = eval_lines(trainer.run_dir)
    for key in ("fid_ab", "fid_ba", "kid_ab", "kid_ba", "kid_identity"):
        assert np.isfinite(line[key]), key
    assert line["score"] == pytest.approx(line["kid_ab"] + line["kid_ba"], abs=2e-6)
    assert line["fid_ab"] > 0 and line["best"] is True
    assert len(list((trainer.run_dir / "validation").glob("real_*.npy"))) == 2


def test_amp_auto_uses_bf16_only_where_kernels_are_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: True)
    assert resolve_amp("auto", cpu) == "bf16" and resolve_amp("none", cpu) == "none"
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: False)
    assert resolve_amp("auto", cpu) == "none"
    with pytest.raises(ValueError, match="no native bf16"):
        resolve_amp("bf16", cpu)


def test_native_bf16_follows_the_cpu_probe(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert trainer_module.native_bf16(torch.device("cpu")) is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert trainer_module.native_bf16(torch.device("cpu")) is True


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resume_continues_exactly(tmp_path):
    root = tmp_path / "data"
    write_domain(root / "trainA", 6, seed=1)
    write_domain(root / "trainB", 8, seed=2)
    common = ["--dataroot", str(root), "--checkpoints-dir", str(tmp_path), "--threads", "1", "--amp", "none"]
    tiny = ["--ngf", "4", "--ndf", "4", "--n-blocks", "1", "--netF-nc", "16", "--num-patches", "16"]
    tiny += ["--load-size", "36", "--crop-size", "32", "--n-epochs", "1", "--n-epochs-decay", "1"]
    tiny += ["--print-freq", "1", "--save-latest-freq", "1000", "--sample-freq", "1000"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "training.cli", "train"]
    subprocess.run([*cmd, *common, *tiny, "--name", "whole", "--max-iters", "12"], check=True, env=env, timeout=300)

    proc = subprocess.Popen([*cmd, *common, *tiny, "--name", "cut", "--max-iters", "100000"], env=env)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    stopped = torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["iteration"]
    assert 3 <= stopped < 12, "stop at once, well before the end; the comparison below needs iterations left"
    assert read_log(tmp_path / "cut")[-1]["iteration"] == stopped

    resume = ["--dataroot", str(root), "--checkpoints-dir", str(tmp_path), "--name", "cut", "--resume"]
    subprocess.run([*cmd, *resume, "--max-iters", "12", "--print-freq", "1"], check=True, env=env, timeout=300)
    whole, cut = read_log(tmp_path / "whole"), read_log(tmp_path / "cut")
    assert [r["iteration"] for r in cut] == list(range(1, 13))
    for want, got in zip(whole, cut, strict=True):
        for key in LOSS_KEYS:  # logged to 6 decimals; a wrong resume (data order, RNG) is off by far more
            assert got[key] == pytest.approx(want[key], abs=1e-5), (got["iteration"], key)


class FakeWriter:
    """Records what the trainer sends to TensorBoard."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.images: list[tuple[str, tuple[int, ...], int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((step, value))

    def add_image(self, tag: str, image: np.ndarray, step: int, dataformats: str) -> None:
        assert dataformats == "HWC"
        self.images.append((tag, image.shape, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_gets_losses_learning_rate_scores_and_samples(tiny_dataroot, tmp_path, monkeypatch):
    writer = FakeWriter()
    monkeypatch.setattr(trainer_module, "open_tensorboard", lambda folder: writer)
    cfg = tiny_config(tiny_dataroot, tmp_path, max_iters=4, eval_every=2, print_freq=2, data=_val_data(tiny_dataroot))
    trainer = Trainer(cfg)
    trainer.validator = ScriptedValidator([0.4, 0.3])
    trainer.fit()
    assert [step for step, _ in writer.scalars["loss/g/total"]] == [2, 4]
    assert writer.scalars["lr"][0] == (2, pytest.approx(cfg.optim.lr))
    assert writer.scalars["val/score"] == [(2, 0.4), (4, 0.3)]
    assert [(tag, step) for tag, _, step in writer.images] == [("val/samples", 2), ("val/samples", 4)]
    assert writer.closed
    evals = eval_lines(trainer.run_dir)
    assert all(e["cpu_hours"] > 0 and e["wall_hours"] > 0 for e in evals)
    assert evals[1]["cpu_hours"] >= evals[0]["cpu_hours"]


def test_without_tensorboard_installed_the_trainer_logs_to_jsonl_only(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert trainer_module.open_tensorboard(tmp_path / "tb") is None
