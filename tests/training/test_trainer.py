"""Training loop: resume determinism, checkpoints and logs, data errors, schedule, SimDCL step."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.training.conftest import tiny_config, write_domain
from training.checkpoint import load_state_file
from training.config import ModelConfig, OptimConfig
from training.data import DataError, UnalignedDataset
from training.step import train_step
from training.task import SimDCLTask
from training.trainer import Trainer, lr_multiplier

LOSS_KEYS = ("d/a", "d/b", "g/gan_ab", "g/nce_ab", "g/idt_a", "g/total")


def read_log(run_dir) -> list[dict]:
    """The training lines of a run's metrics.jsonl (validation lines left out)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("event") != "eval"]


def test_lr_schedule_matches_the_authors_linear_policy():
    assert lr_multiplier(1, 200, 200) == 1.0
    assert lr_multiplier(200, 200, 200) == 1.0
    assert lr_multiplier(201, 200, 200) == pytest.approx(1 - 1 / 201)
    assert lr_multiplier(400, 200, 200) == pytest.approx(1 / 201)


def test_resumed_run_continues_exactly(tiny_dataroot, tmp_path):
    Trainer(tiny_config(tiny_dataroot, tmp_path / "a", max_iters=10)).fit()
    full = read_log(tmp_path / "a" / "tiny")
    Trainer(tiny_config(tiny_dataroot, tmp_path / "b", max_iters=5)).fit()  # "interrupted" after 5
    Trainer(tiny_config(tiny_dataroot, tmp_path / "b", max_iters=10), resume=True).fit()
    resumed = read_log(tmp_path / "b" / "tiny")
    assert [r["iteration"] for r in resumed] == list(range(1, 11))
    # Iterations 6-10 cross an epoch boundary (8 iterations per epoch) and enter the decay phase.
    for want, got in zip(full[5:], resumed[5:], strict=True):
        for key in LOSS_KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["iteration"], key)


def test_run_writes_checkpoints_samples_and_official_files(tiny_run):
    run = tiny_run.run_dir
    state = torch.load(run / "latest.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == 3
    assert set(state["networks"]) == {"G_A", "G_B", "D_A", "D_B", "F1", "F2"}
    assert set(state["optimizers"]) == {"g", "d", "f"}
    for name in ("G_A", "G_B", "D_A", "D_B", "F1", "F2"):
        sd = load_state_file(run / f"latest_net_{name}.pth")
        assert sd.keys() == state["networks"][name].keys()
    assert not list(run.glob(".*.tmp")), "temporary files left behind"
    grid = Image.open(run / "samples" / "iter_0000002.png")
    assert grid.size == (4 * 32, 32)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["model"]["ngf"] == 4


def test_missing_dataroot_and_empty_domain_name_the_path(tmp_path):
    from training.config import DataConfig

    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        UnalignedDataset(DataConfig(dataroot=str(tmp_path / "nope")))
    write_domain(tmp_path / "d" / "trainA", 2)
    (tmp_path / "d" / "trainB").mkdir()
    with pytest.raises(DataError, match="trainB"):
        UnalignedDataset(DataConfig(dataroot=str(tmp_path / "d")))


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    write_domain(tmp_path / "trainA", 3)
    write_domain(tmp_path / "trainB", 3)
    (tmp_path / "trainA" / "001.png").write_bytes(b"not an image")
    trainer = Trainer(tiny_config(tmp_path, tmp_path / "ck", max_iters=3))
    trainer.fit()
    records = read_log(trainer.run_dir)
    assert records[-1]["skipped_images"] >= 1
    assert all(torch.isfinite(torch.tensor(r["g/total"])) for r in records)


def test_small_images_are_resized_up_to_the_crop(tmp_path):
    from training.config import DataConfig

    write_domain(tmp_path / "trainA", 2, size=(10, 7))
    write_domain(tmp_path / "trainB", 2, size=(12, 9))
    item = UnalignedDataset(DataConfig(dataroot=str(tmp_path), load_size=36, crop_size=32))[0]
    assert item["A"].shape == item["B"].shape == (3, 32, 32)
    assert -1 <= item["A"].min() and item["A"].max() <= 1


def test_simdcl_step_trains_its_similarity_heads():
    torch.manual_seed(0)
    task = SimDCLTask(ModelConfig(model="simdcl", ngf=4, ndf=4, n_blocks=1))
    task.build_heads(64)
    task.initialize()
    opt = task.make_optimizers(OptimConfig())
    assert opt.f.param_groups[0]["lr"] == 2e-4 and opt.f.param_groups[0]["betas"] == (0.5, 0.999)
    before = task.sim_real_a.model[0].weight.clone()
    out = train_step(task, opt, torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1)
    assert 0 <= out["g/sim"].item() <= 5  # two mean |u - v| of unit 64-vectors, times 10
    total = 0.5 * (out["g/gan_ab"] + out["g/gan_ba"] + out["g/nce_ab"] + out["g/nce_ba"])
    total += 0.5 * (out["g/idt_a"] + out["g/idt_b"]) + out["g/sim"]
    assert out["g/total"].item() == pytest.approx(total.item(), rel=1e-6)
    assert not torch.equal(before, task.sim_real_a.model[0].weight)


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="this CPU has no bf16 convolution kernels (AVX-512 BF16/AMX); bf16 training is refused here",
)
def test_bf16_losses_track_fp32(tiny_dataroot, tmp_path):
    Trainer(tiny_config(tiny_dataroot, tmp_path / "f", max_iters=8)).fit()
    Trainer(tiny_config(tiny_dataroot, tmp_path / "h", max_iters=8, amp="bf16")).fit()
    fp32, bf16 = read_log(tmp_path / "f" / "tiny"), read_log(tmp_path / "h" / "tiny")
    for a, b in zip(fp32, bf16, strict=True):
        assert b["g/total"] == pytest.approx(a["g/total"], rel=0.05)


def test_simdcl_real_side_rows_carry_gradient_but_nce_keys_do_not():
    torch.manual_seed(0)
    task = SimDCLTask(ModelConfig(model="simdcl", ngf=4, ndf=4, n_blocks=1))
    task.build_heads(64)
    real_a, real_b = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    tr = task.translate(real_a, real_b)
    losses = task.g_losses(real_a, real_b, tr)
    # SimDCL's similarity term reads the key rows before PatchNCE detaches them (spec 9.2) ...
    sim_grads = torch.autograd.grad(losses["g/sim"], tr.feats_real_a, retain_graph=True, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in sim_grads)
    # ... while the contrastive term itself gives the real (key) side nothing.
    nce_grads = torch.autograd.grad(losses["g/nce_ab"], tr.feats_real_a, allow_unused=True)
    assert all(g is None for g in nce_grads)


def test_simdcl_preconditions_are_checked_up_front(tiny_dataroot, tmp_path):
    with pytest.raises(ValueError, match="SimDCL needs"):
        tiny_config(tiny_dataroot, tmp_path, model=ModelConfig(model="simdcl", ngf=4, ndf=4, n_blocks=1))


def test_resume_takes_the_stored_configuration(tiny_dataroot, tmp_path):
    from training.train_cli import build_parser, config_from_args, resumed_config

    Trainer(tiny_config(tiny_dataroot, tmp_path, max_iters=2)).fit()
    argv = ["--dataroot", str(tiny_dataroot), "--name", "tiny", "--checkpoints-dir", str(tmp_path), "--resume"]
    changed = [*argv, "--lr", "0.5", "--ngf=8", "--val-side", "64"]
    assert config_from_args(build_parser().parse_args(changed)).val_side == 64
    # Validation at another side would make best.pt's stored score incomparable with the new ones.
    with pytest.raises(ValueError, match="start a new run to change --lr, --ngf, --val-side"):
        resumed_config(config_from_args(build_parser().parse_args(changed)), changed)
    argv += ["--max-iters", "4", "--n-epochs-decay=3", "--print-freq", "1"]
    cfg = resumed_config(config_from_args(build_parser().parse_args(argv)), argv)
    assert (cfg.model.ngf, cfg.data.crop_size, cfg.optim.lr) == (4, 32, 2e-4)  # the run's, not the defaults
    assert cfg.amp == "none"  # stored, not the command line's default (auto)
    assert (cfg.max_iters, cfg.n_epochs_decay, cfg.n_epochs) == (4, 3, 1)  # run control and given schedule
    Trainer(cfg, resume=True).fit()
    assert [r["iteration"] for r in read_log(tmp_path / "tiny")] == [1, 2, 3, 4]


def test_epoch_snapshots_use_the_authors_names(tiny_dataroot, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataroot, tmp_path, max_iters=8, save_epoch_freq=1))
    trainer.fit()
    assert (trainer.run_dir / "epoch_1.pt").is_file()
    assert (trainer.run_dir / "1_net_G_A.pth").is_file() and (trainer.run_dir / "1_net_F2.pth").is_file()
