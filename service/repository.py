"""The model repository: the ``model.json`` contract, loading, SHA-256 verification, atomic writes.

A repository is a folder of model folders. A model folder holds either one version,
``<root>/<name>/model.json`` plus one ONNX file per direction (and optionally a float16 variant of each),
or several, one per subfolder named after the version: ``<root>/<name>/<version>/model.json`` (Triton's
layout). The newest version is the greatest in :func:`version_key`'s natural order. The service consumes
these folders, so it owns the schema; the exporter in ``training/`` imports the models below to write
them. This module must not import fastapi, torch or ``training``.

Every write goes through :func:`service.contract.atomic_write_bytes`, so a reader (a server starting up, a second
export) never sees a half-written ONNX file or ``model.json``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.contract import atomic_write_text

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Literal[1] = 1
MODEL_JSON = "model.json"
NAME_PATTERN = r"^[a-z0-9_-]+$"

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Variant = Literal["float32", "float16"]


class ModelRepositoryError(Exception):
    """A model folder that cannot be used: bad JSON, schema error, missing or tampered file."""


class _Frozen(BaseModel):
    # extra="forbid" so a typo in a hand-edited model.json is an error, not a silently ignored field.
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnnxFile(_Frozen):
    """One ONNX file of a direction, relative to the model folder, with its expected digest."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        # Only a bare file name: a path like "../x.onnx" must not let a model.json reach outside its folder.
        if not value or PurePosixPath(value).name != value or value in {".", ".."} or "\\" in value:
            raise ValueError(f"must be a plain file name inside the model folder, got {value!r}")
        return value


class DirectionSpec(_Frozen):
    """One translation direction, e.g. ``horse2zebra``: source and target domain, generator, files."""

    name: Name
    source: str
    target: str
    generator: str = Field(min_length=1, description="training-side generator name, e.g. G_A")
    files: dict[Variant, OnnxFile]

    @field_validator("files")
    @classmethod
    def _float32_required(cls, value: dict[Variant, OnnxFile]) -> dict[Variant, OnnxFile]:
        # float32 is the reference every runtime can execute; float16 is an optional GPU extra.
        if "float32" not in value:
            raise ValueError("a float32 file is required")
        return value


class InputContract(_Frozen):
    """What every ONNX file of the model accepts and returns (the same for both directions)."""

    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    value_range: tuple[float, float] = (-1.0, 1.0)
    channels: Literal[3] = 3
    input_name: str = "image"
    output_name: str = "translated"
    dynamic_axes: tuple[str, ...] = ("batch", "height", "width")
    multiple_of: int = Field(default=4, ge=1, description="H and W must be multiples of this")
    min_size: int = Field(default=8, ge=1, description="smallest H and W the network accepts")
    native_size: int = Field(default=256, ge=1, description="training resolution")
    working_side: int | None = Field(
        default=None,
        ge=8,
        description="the longer side images are scaled to before translation by default (measured best for this "
        "model; a request's max_side overrides it); None: the server's max_side alone",
    )


class Provenance(_Frozen):
    """Where the weights come from: architecture, data, training length and licence."""

    model_type: str = Field(min_length=1, description="dcl or simdcl")
    ngf: int = Field(ge=1)
    n_blocks: int = Field(ge=0)
    antialias: bool
    training_data: str = ""
    iterations: int = Field(default=0, ge=0)
    source: Literal["trained", "official", "test"]
    license: str = ""
    notes: str = ""


class ModelCard(_Frozen):
    """The whole ``model.json``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: Name
    version: str = Field(min_length=1)
    description: str = ""
    domains: tuple[str, str]
    directions: list[DirectionSpec] = Field(min_length=1)
    input: InputContract = Field(default_factory=InputContract)
    provenance: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.domains[0] == self.domains[1]:
            raise ValueError(f"the two domains must differ, got {list(self.domains)}")
        names = [d.name for d in self.directions]
        if len(set(names)) != len(names):
            raise ValueError(f"direction names must be unique, got {names}")
        for d in self.directions:
            if {d.source, d.target} - set(self.domains) or d.source == d.target:
                raise ValueError(
                    f"direction {d.name!r}: source {d.source!r} and target {d.target!r} must be the two "
                    f"different domains {list(self.domains)}"
                )
        return self

    @property
    def direction_names(self) -> list[str]:
        return [d.name for d in self.directions]

    def direction(self, name: str) -> DirectionSpec:
        """The direction called ``name``; the error lists the available ones."""
        for d in self.directions:
            if d.name == name:
                return d
        raise ModelRepositoryError(
            f"model {self.name!r} has no direction {name!r}; available: {', '.join(self.direction_names)}"
        )

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelCard:
        """Parse a ``model.json`` file (or the folder holding one); files are not checked here."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_JSON
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelRepositoryError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:  # a ValueError, not an OSError: a card that is not text at all
            raise ModelRepositoryError(f"{path} is not UTF-8 text: {exc}") from exc
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            # pydantic reports JSON syntax errors as a ValidationError too ("Invalid JSON").
            raise ModelRepositoryError(f"{path} is not a valid model card:\n{exc}") from exc

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Atomically write ``<directory>/model.json``; write the ONNX files first, so the card never points
        at files that are not there yet."""
        path = Path(directory) / MODEL_JSON
        atomic_write_text(path, self.to_json())
        return path


@dataclass(frozen=True)
class LoadedModel:
    """A validated model folder: its card and the absolute path of each (direction, variant) file."""

    card: ModelCard
    root: Path
    files: Mapping[str, Mapping[str, Path]]

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    def path(self, direction: str, variant: Variant = "float32") -> Path:
        """The ONNX file of ``direction`` in ``variant``; errors name what is available."""
        spec = self.card.direction(direction)
        if variant not in spec.files:
            raise ModelRepositoryError(
                f"model {self.name!r} direction {direction!r} has no {variant} file; "
                f"available: {', '.join(spec.files)}"
            )
        return self.files[direction][variant]


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so a large ONNX file is never held in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order of versions, which picks the newest: runs of digits compare as numbers, so ``"9" < "10"``,
    ``"1.9" < "1.10"`` and ``"2026-02-01" < "2026-11-01"``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version))


def load_model_dir(directory: str | os.PathLike[str], *, verify: bool = True) -> LoadedModel:
    """Load and check one model folder, ``<name>/`` or ``<name>/<version>/``.

    Refuses (``ModelRepositoryError``) a missing or invalid ``model.json``, a card whose ``name`` is not
    the folder name (or, in a version folder, whose ``name`` and ``version`` are not the parent's name and
    the folder's), a missing ONNX file and, when ``verify`` is true, a file whose SHA-256 differs
    from the card; each message names the offending file.
    """
    root = Path(directory).resolve()
    card = ModelCard.load(root / MODEL_JSON)
    if card.name != root.name and (card.name, card.version) != (root.parent.name, root.name):
        raise ModelRepositoryError(
            f"{root / MODEL_JSON}: name {card.name!r} differs from its folder {root.name!r}, and name and "
            f"version {card.name!r}/{card.version!r} differ from its folders {root.parent.name!r}/{root.name!r}"
        )
    files: dict[str, dict[str, Path]] = {}
    for spec in card.directions:
        files[spec.name] = {}
        for variant, entry in spec.files.items():
            path = root / entry.path
            if not path.is_file():
                raise ModelRepositoryError(f"model {card.name!r}: missing ONNX file {path}")
            if verify:
                actual = sha256_file(path)
                if actual != entry.sha256:
                    raise ModelRepositoryError(
                        f"model {card.name!r}: SHA-256 mismatch for {path}: model.json says {entry.sha256}, "
                        f"the file has {actual}; the file was modified or corrupted, refusing to load it"
                    )
            files[spec.name][variant] = path
    logger.debug("loaded model %s v%s from %s", card.name, card.version, root)
    return LoadedModel(card=card, root=root, files=files)


def _version_dirs(model_dir: Path) -> list[Path]:
    """The folders of ``model_dir``'s versions: itself (one version) or its subfolders with a card."""
    versions = [d for d in sorted(model_dir.iterdir()) if (d / MODEL_JSON).is_file()]
    if (model_dir / MODEL_JSON).is_file():
        if versions:
            # Two layouts at once: which one is the model is a guess the service must not make.
            raise ModelRepositoryError(
                f"{model_dir} has both a model.json and version folders with one ({versions[0].name}); keep one layout"
            )
        return [model_dir]
    return versions


def scan_repository(root: str | os.PathLike[str], *, verify: bool = True) -> list[LoadedModel]:
    """Load every version of every model under ``root``, sorted by name, then oldest version first.

    A broken model raises rather than being skipped: serving a repository with a model silently
    missing is worse than refusing to start (or, on a reload, than keeping the versions already served).
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelRepositoryError(f"model repository {root} is not a folder")
    models = [model for m in sorted(root.iterdir()) if m.is_dir() for model in _load_versions(m, verify=verify)]
    return sorted(models, key=lambda m: (m.name, version_key(m.version)))


def _load_versions(model_dir: Path, *, verify: bool) -> list[LoadedModel]:
    """Every version of one model folder. A version folder's card must name the model folder and itself
    (a card named after its version folder would be a second model, ``load_model_dir`` alone accepts it), and
    no two versions may be equal in natural order (``01`` and ``1``): which is the newest would be a guess."""
    folders = _version_dirs(model_dir)
    models = [load_model_dir(d, verify=verify) for d in folders]
    if folders == [model_dir]:
        return models
    newest: dict[tuple[tuple[int, int | str], ...], str] = {}
    for folder, model in zip(folders, models, strict=True):
        if (model.name, model.version) != (model_dir.name, folder.name):
            raise ModelRepositoryError(
                f"{folder / MODEL_JSON}: in a version folder the card's name and version must be "
                f"{model_dir.name!r}/{folder.name!r}, not {model.name!r}/{model.version!r}"
            )
        same = newest.setdefault(version_key(model.version), model.version)
        if same != model.version:
            raise ModelRepositoryError(
                f"{model_dir}: versions {same!r} and {model.version!r} are equal in natural order; rename one"
            )
    return models
