"""model.json schema, loading and verification of model folders, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.contract import atomic_write_bytes, atomic_write_text
from service.repository import (
    MODEL_JSON,
    ModelCard,
    ModelRepositoryError,
    load_model_dir,
    scan_repository,
    sha256_file,
    version_key,
)

DOCUMENTED_KEYS = {
    "schema_version",
    "name",
    "version",
    "description",
    "domains",
    "directions",
    "input",
    "provenance",
}


def _card_dict(model_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((model_dir / MODEL_JSON).read_text())
    return data


def test_round_trip_through_json_and_disk(tiny_repo: Path, tmp_path: Path) -> None:
    card = ModelCard.load(tiny_repo / "tiny" / MODEL_JSON)
    assert set(json.loads(card.to_json())) == DOCUMENTED_KEYS
    assert ModelCard.model_validate_json(card.to_json()) == card
    written = card.write(tmp_path)
    assert written == tmp_path / MODEL_JSON
    assert ModelCard.load(tmp_path) == card  # a folder works as well as the file


def test_load_model_dir_resolves_every_file(tiny_repo: Path) -> None:
    model = load_model_dir(tiny_repo / "tiny")
    assert model.name == "tiny"
    assert model.card.direction_names == ["a2b", "b2a"]
    assert model.card.domains == ("a", "b")
    assert model.path("a2b") == (tiny_repo / "tiny" / "a2b.onnx").resolve()
    assert model.path("b2a").is_file()


def test_unknown_direction_and_variant_list_the_available_ones(tiny_repo: Path) -> None:
    model = load_model_dir(tiny_repo / "tiny")
    with pytest.raises(ModelRepositoryError, match="no direction 'x2y'; available: a2b, b2a"):
        model.path("x2y")
    with pytest.raises(ModelRepositoryError, match="no float16 file; available: float32"):
        model.path("a2b", "float16")


def test_tampered_onnx_file_is_refused_by_name(tiny_model_copy: Path) -> None:
    onnx = tiny_model_copy / "b2a.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match="SHA-256 mismatch") as info:
        load_model_dir(tiny_model_copy)
    assert str(onnx.resolve()) in str(info.value)
    assert "a2b.onnx" not in str(info.value)
    assert load_model_dir(tiny_model_copy, verify=False).path("b2a") == onnx.resolve()


def test_missing_onnx_file_is_refused_by_name(tiny_model_copy: Path) -> None:
    (tiny_model_copy / "a2b.onnx").unlink()
    with pytest.raises(ModelRepositoryError, match=r"missing ONNX file .*a2b\.onnx"):
        load_model_dir(tiny_model_copy, verify=False)


def test_missing_and_malformed_model_json(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelRepositoryError, match="cannot read"):
        load_model_dir(folder)
    (folder / MODEL_JSON).write_text("{not json")
    with pytest.raises(ModelRepositoryError, match="not a valid model card"):
        load_model_dir(folder)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets the dotted ``path`` (list indices as numbers) in a card dict."""

    def edit(card: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = card
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("directions.1.name", "a2b"), "direction names must be unique"),
        (_set("directions.0.source", "c"), "must be the two different domains"),
        (_set("directions.0.target", "a"), "must be the two different domains"),
        (_set("domains", ["a", "a"]), "the two domains must differ"),
        (_set("input.multiple_of", 0), "multiple_of"),
        (_set("directions.0.files.float32.path", "../a2b.onnx"), "plain file name"),
        (_set("directions.0.files.float32.sha256", "abc"), "sha256"),
        (_set("directions.0.files", {}), "a float32 file is required"),
        (_set("schema_version", 2), "schema_version"),
        (_set("name", "Tiny Model"), "name"),
        (_set("provenance.source", "downloaded"), "source"),
        (_set("surprise", 1), "surprise"),
    ],
)
def test_schema_errors_are_refused(
    tiny_model_copy: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    card = _card_dict(tiny_model_copy)
    edit(card)
    (tiny_model_copy / MODEL_JSON).write_text(json.dumps(card))
    with pytest.raises(ModelRepositoryError, match=message):
        load_model_dir(tiny_model_copy)


def test_card_name_must_match_its_folder(tiny_model_copy: Path) -> None:
    renamed = tiny_model_copy.rename(tiny_model_copy.with_name("other"))
    with pytest.raises(ModelRepositoryError, match="differs from its folder 'other'"):
        load_model_dir(renamed)


def test_scan_repository_finds_models_and_skips_other_folders(tiny_repo: Path, tiny_model_copy: Path) -> None:
    assert [m.name for m in scan_repository(tiny_repo)] == ["tiny"]
    root = tiny_model_copy.parent
    (root / "notes").mkdir()  # no model.json: not a model
    (root / "README.txt").write_text("hello")
    assert [m.name for m in scan_repository(root)] == ["tiny"]
    (tiny_model_copy / "a2b.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelRepositoryError, match="a2b.onnx"):
        scan_repository(root)
    with pytest.raises(ModelRepositoryError, match="not a folder"):
        scan_repository(root / "missing")


def _version_folder(tiny_model_copy: Path, version: str) -> Path:
    """Move the flat ``tiny`` model into the version folder ``tiny/<version>/`` (card edited to match)."""
    folder = tiny_model_copy / version
    folder.mkdir()
    for file in list(tiny_model_copy.iterdir()):
        if file.is_file():
            file.rename(folder / file.name)
    card = _card_dict(folder)
    card["version"] = version
    (folder / MODEL_JSON).write_text(json.dumps(card))
    return folder


def test_versions_side_by_side_are_scanned_oldest_first(tiny_model_copy: Path) -> None:
    for version in ("10", "9"):
        folder = _version_folder(tiny_model_copy, version)
        for file in folder.iterdir():  # the next version starts from this one's files
            (tiny_model_copy / file.name).write_bytes(file.read_bytes())
    for file in tiny_model_copy.iterdir():
        if file.is_file():
            file.unlink()
    models = scan_repository(tiny_model_copy.parent)
    assert [(m.name, m.version) for m in models] == [("tiny", "9"), ("tiny", "10")]
    assert models[1].path("a2b") == (tiny_model_copy / "10" / "a2b.onnx").resolve()


def test_a_version_folder_must_match_its_card(tiny_model_copy: Path) -> None:
    folder = _version_folder(tiny_model_copy, "2")
    wrong = folder.rename(tiny_model_copy / "3")
    with pytest.raises(ModelRepositoryError, match=r"'tiny'/'2' differ from its folders 'tiny'/'3'"):
        scan_repository(tiny_model_copy.parent)
    wrong.rename(folder)
    assert [m.version for m in scan_repository(tiny_model_copy.parent)] == ["2"]


def test_a_version_folder_whose_card_names_the_folder_is_not_a_second_model(tiny_model_copy: Path) -> None:
    folder = _version_folder(tiny_model_copy, "2")
    renamed = folder.rename(tiny_model_copy / "v2")
    card = _card_dict(renamed)
    card["name"] = "v2"
    (renamed / MODEL_JSON).write_text(json.dumps(card))
    with pytest.raises(ModelRepositoryError, match=r"must be 'tiny'/'v2', not 'v2'/'2'"):
        scan_repository(tiny_model_copy.parent)


def test_versions_equal_in_natural_order_are_refused(tiny_model_copy: Path) -> None:
    for version in ("01", "1"):
        folder = _version_folder(tiny_model_copy, version)
        for file in folder.iterdir():  # the next version starts from this one's files
            (tiny_model_copy / file.name).write_bytes(file.read_bytes())
    (tiny_model_copy / MODEL_JSON).unlink()
    with pytest.raises(ModelRepositoryError, match=r"versions '01' and '1' are equal in natural order"):
        scan_repository(tiny_model_copy.parent)


def test_both_layouts_in_one_model_folder_are_refused(tiny_model_copy: Path) -> None:
    folder = _version_folder(tiny_model_copy, "2")
    (tiny_model_copy / MODEL_JSON).write_bytes((folder / MODEL_JSON).read_bytes())
    with pytest.raises(ModelRepositoryError, match="both a model.json and version folders"):
        scan_repository(tiny_model_copy.parent)


def test_versions_compare_in_natural_order() -> None:
    ordered = ["1", "1.9", "2", "9", "10"]
    assert sorted(["10", "1.9", "9", "2", "1"], key=version_key) == ordered
    assert version_key("1.9") < version_key("1.10") and version_key("2026-02-01") < version_key("2026-11-01")


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk_bytes=1024) == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "model.json"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a2b.onnx"
    target.write_bytes(b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a2b.onnx"]
