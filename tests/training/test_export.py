"""Export and import-official: ONNX files that onnxruntime runs with PyTorch's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.repository import load_model_dir
from service.runtime import OnnxRunner, create_session
from tests.requires import require_module
from training.export import ExportError, import_official_main, infer_architecture
from training.export import main as export_main


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    return OnnxRunner(create_session(path, device="cpu"), device="cpu").run(x.numpy())


def write_official_layout(folder: Path, state: dict, prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("G_A", "G_B"):
        torch.save({prefix + k: v for k, v in state.items()}, folder / f"latest_net_{name}.pth")


@pytest.mark.parametrize("prefix", ["", "module."])
def test_import_official_reproduces_reference_generator(load_ref, tmp_path, prefix):
    ref = load_ref("generator")
    write_official_layout(tmp_path / "ckpt", ref["state_dict"], prefix)
    code = import_official_main(
        [
            "--checkpoints-dir",
            str(tmp_path / "ckpt"),
            "--model-name",
            "h2z",
            "--domains",
            "horse",
            "zebra",
            "--out",
            str(tmp_path / "models"),
        ]
    )
    assert code == 0
    model = load_model_dir(tmp_path / "models" / "h2z")
    assert model.card.direction_names == ["horse2zebra", "zebra2horse"]
    assert model.card.provenance.source == "official"
    assert (model.card.provenance.ngf, model.card.provenance.n_blocks) == (16, 9)
    out = run_onnx(model.path("horse2zebra"), ref["input"])
    assert np.abs(out - ref["output"].numpy()).max() <= 1e-4


def test_import_official_refuses_a_state_dict_it_cannot_match(load_ref, tmp_path):
    state = dict(load_ref("generator")["state_dict"])
    state["model.30.weight"] = state["model.30.weight"][:, :8]  # wrong shape
    write_official_layout(tmp_path / "ckpt", state)
    args = [
        "--checkpoints-dir",
        str(tmp_path / "ckpt"),
        "--model-name",
        "bad",
        "--domains",
        "a",
        "b",
        "--out",
        str(tmp_path / "models"),
    ]
    assert import_official_main(args) == 1
    assert not (tmp_path / "models" / "bad" / "model.json").exists()
    with pytest.raises(ExportError, match="anti-aliased"):
        infer_architecture({k: v for k, v in state.items() if not k.endswith("filt")})


def test_export_from_training_checkpoint(tiny_run, tmp_path):
    code = export_main(
        [
            "--checkpoint",
            str(tiny_run.run_dir),
            "--model-name",
            "tiny",
            "--domains",
            "a",
            "b",
            "--out",
            str(tmp_path / "models"),
            "--training-data",
            "generated test images",
        ]
    )
    assert code == 0
    model = load_model_dir(tmp_path / "models" / "tiny")
    card = json.loads((tmp_path / "models" / "tiny" / "model.json").read_text())
    assert card["provenance"]["iterations"] == tiny_run.iteration
    assert card["input"]["native_size"] == tiny_run.cfg.data.crop_size
    for direction, net in (("a2b", tiny_run.task.gen_ab), ("b2a", tiny_run.task.gen_ba)):
        for h, w in ((32, 32), (40, 56), (8, 8)):
            x = torch.rand(3, 3, h, w) * 2 - 1
            with torch.no_grad():
                want = net.eval()(x).numpy()
            assert np.abs(run_onnx(model.path(direction), x) - want).max() <= 1e-4


def test_fp16_variant_is_close(tiny_run, tmp_path):
    require_module("onnxconverter_common", "pip install -e '.[fp16]'")
    from service.repository import Provenance
    from training.export import export_model, fp16_psnr

    export_model(
        {"G_A": tiny_run.task.gen_ab, "G_B": tiny_run.task.gen_ba},
        name="half",
        domains=("a", "b"),
        out_root=tmp_path,
        provenance=Provenance(model_type="dcl", ngf=4, n_blocks=1, antialias=True, source="test"),
        native_size=32,
        fp16=True,
        parity_sizes=((16, 16),),
    )
    model = load_model_dir(tmp_path / "half")
    assert fp16_psnr(model.path("a2b"), model.path("a2b", "float16"), size=64) >= 40


def test_a_failed_export_leaves_the_served_model_intact(tiny_run, tmp_path, monkeypatch):
    from training import export

    args = ["--checkpoint", str(tiny_run.run_dir), "--model-name", "tiny", "--domains", "a", "b",
            "--out", str(tmp_path)]  # fmt: skip
    assert export_main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "tiny").iterdir()}
    monkeypatch.setattr(export, "check_parity", lambda *a, **k: [((8, 8), 1.0)])
    assert export_main(args) == 1
    after = {p.name: p.read_bytes() for p in (tmp_path / "tiny").iterdir()}
    assert after == before  # no staged leftovers, old files and card untouched
    load_model_dir(tmp_path / "tiny")  # still loads, SHA-256 verified


def test_versions_are_never_replaced_silently_and_versioned_exports_serve_side_by_side(tiny_run, tmp_path, caplog):
    from service.repository import scan_repository

    args = ["--checkpoint", str(tiny_run.run_dir), "--model-name", "tiny", "--domains", "a", "b",
            "--out", str(tmp_path / "flat")]  # fmt: skip
    assert export_main(args) == 0
    card = (tmp_path / "flat" / "tiny" / "model.json").read_text()
    assert export_main([*args, "--version", "2"]) == 1  # would replace version 1
    assert "holds version 1" in caplog.text and (tmp_path / "flat" / "tiny" / "model.json").read_text() == card
    assert export_main([*args, "--version", "2", "--versioned"]) == 1  # would mix the two layouts
    assert export_main(args) == 0  # the same version again: a re-export replaces it

    versioned = ["--checkpoint", str(tiny_run.run_dir), "--model-name", "tiny", "--domains", "a", "b",
                 "--out", str(tmp_path / "repo"), "--versioned"]  # fmt: skip
    assert export_main([*versioned, "--version", "1"]) == 0
    assert export_main([*versioned, "--version", "2"]) == 0
    assert export_main([*versioned, "--version", "01"]) == 1  # equal to 1 in natural order: the service refuses
    assert "equals '1' in natural order" in caplog.text
    assert [m.version for m in scan_repository(tmp_path / "repo")] == ["1", "2"]
    assert export_main([*versioned[:-1], "--version", "3"]) == 1  # a flat export beside version folders


@pytest.mark.parametrize("content", [b"", b"\x00not a checkpoint", "truncated"])
def test_a_damaged_checkpoint_is_one_error_line(tiny_run, tmp_path, caplog, content):
    run = tmp_path / "run"
    run.mkdir()
    data = (tiny_run.run_dir / "latest.pt").read_bytes()
    (run / "latest.pt").write_bytes(data[:300] if content == "truncated" else content)
    args = ["--checkpoint", str(run), "--model-name", "m", "--domains", "a", "b", "--out", str(tmp_path / "out")]
    assert export_main(args) == 2
    assert "cannot be read" in caplog.text or "not a usable training checkpoint" in caplog.text
    official = tmp_path / "official"
    official.mkdir()
    for name in ("G_A", "G_B"):
        (official / f"latest_net_{name}.pth").write_bytes(b"0123456789")
    args = ["--checkpoints-dir", str(official), "--model-name", "o", "--domains", "a", "b"]
    assert import_official_main([*args, "--out", str(tmp_path / "o")]) == 2  # as export: a damaged input
    path = official / "latest_net_G_A.pth"
    assert f"{path} cannot be read" in caplog.text and f"{path}: {path}" not in caplog.text
