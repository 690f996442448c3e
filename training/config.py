"""Frozen configuration records. Only ``cli.py`` parses argv; every checkpoint stores these.

Field names mirror the authors' options (ngf, lambda_NCE -> lambda_nce, nce_T -> nce_t, ...)
so their users recognise them; quirks of the authors' code that we keep are named here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ModelName = Literal["dcl", "simdcl"]


# The loss weights each model's code applies, with the authors' defaults (spec 8.3, 9.3). SimDCL's
# code never applies lambda_NCE or an identity weight, and DCL has no similarity loss.
APPLIED_WEIGHTS: dict[str, dict[str, float]] = {
    "dcl": {"lambda_nce": 2.0, "lambda_idt": 1.0},
    "simdcl": {"lambda_sim": 10.0},
}
WEIGHT_FLAGS = {"lambda_nce": "--lambda-NCE", "lambda_idt": "--lambda-IDT", "lambda_sim": "--lambda-SIM"}


@dataclass(frozen=True)
class ModelConfig:
    """Networks and loss weights (spec sections 1.2, 8, 9).

    ``lambda_nce``, ``lambda_idt`` and ``lambda_sim`` default to None, which means the chosen
    model's default (:data:`APPLIED_WEIGHTS`). A weight the model does not apply is refused rather
    than accepted and recorded in ``config.json`` while changing nothing; after construction the
    applied weights hold numbers and the others stay None.
    """

    model: ModelName = "dcl"
    input_nc: int = 3
    output_nc: int = 3
    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 9
    n_layers_d: int = 3
    netf_nc: int = 256
    nce_layers: tuple[int, ...] = (4, 8, 12, 16)
    num_patches: int = 256
    nce_t: float = 0.07
    gan_mode: Literal["hinge", "lsgan"] = "hinge"
    lambda_gan: float = 1.0
    lambda_nce: float | None = None
    lambda_idt: float | None = None
    lambda_sim: float | None = None

    def __post_init__(self) -> None:
        if list(self.nce_layers) != sorted(self.nce_layers) or not self.nce_layers or self.nce_layers[0] < 0:
            raise ValueError("nce_layers must be ascending layer indices >= 0")
        if self.num_patches < 1 or self.nce_t <= 0:
            raise ValueError("num_patches must be >= 1 and nce_T > 0 (PatchNCE divides by the temperature)")
        if self.model == "simdcl" and self.num_patches != 256:
            # The similarity heads read a (layers, 256 patches, netF_nc) stack, one channel per layer
            # (spec 9.1); the authors also fix netF_nc at 256, but the heads' weights do not depend on it.
            raise ValueError("SimDCL's similarity heads need num_patches=256 (spec 9.1)")
        applied = APPLIED_WEIGHTS[self.model]
        for name, flag in WEIGHT_FLAGS.items():
            value = getattr(self, name)
            if name not in applied and value is not None:
                raise ValueError(f"{flag} has no effect with --model {self.model} (its loss has no such weight)")
            if name in applied and value is None:
                object.__setattr__(self, name, applied[name])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Rebuild a stored record. Records written before unapplied weights were refused still
        carry them (at values that never had an effect); they are dropped here."""
        raw = {**raw, "nce_layers": tuple(raw["nce_layers"])}
        for name in WEIGHT_FLAGS:
            if name not in APPLIED_WEIGHTS[raw.get("model", "dcl")]:
                raw[name] = None
        return cls(**raw)


@dataclass(frozen=True)
class OptimConfig:
    """Adam for G and D; the projection heads' optimiser differs per model (spec 1.3).

    ``head_lr``/``head_betas`` of None mean the authors' behaviour: DCL builds the heads'
    Adam with PyTorch defaults (1e-3, (0.9, 0.999)), SimDCL with ``lr`` and the G/D betas.
    """

    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    head_lr: float | None = None
    head_betas: tuple[float, float] | None = None

    def head_hparams(self, model: ModelName) -> tuple[float, tuple[float, float]]:
        default = (1e-3, (0.9, 0.999)) if model == "dcl" else (self.lr, (self.beta1, self.beta2))
        return (
            self.head_lr if self.head_lr is not None else default[0],
            self.head_betas if self.head_betas is not None else default[1],
        )


@dataclass(frozen=True)
class DataConfig:
    dataroot: str = ""
    load_size: int = 286
    crop_size: int = 256
    no_flip: bool = False
    max_dataset_size: int | None = None
    # 0: decode in the training process. Each image is decoded and resized once and then served
    # from a RAM cache (cache_mb), so a worker process only pays where many cores sit idle.
    num_workers: int = 0
    batch_size: int = 1
    # Images per domain held out of training for validation (picked by seed from trainA/trainB;
    # never the test split, which gives the final figures only). 0 trains on every image.
    val_size: int = 0
    cache_mb: int = 2048

    def __post_init__(self) -> None:
        if self.crop_size % 4 or self.crop_size < 8:
            raise ValueError("crop_size must be a multiple of 4 and at least 8 (the generator's contract)")
        if self.load_size < self.crop_size:
            raise ValueError("load_size must be >= crop_size")
        if self.val_size < 0 or self.cache_mb < 0 or self.num_workers < 0:
            raise ValueError("val_size, cache_mb and num_workers must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    name: str = "experiment"
    checkpoints_dir: str = "checkpoints"
    n_epochs: int = 200
    n_epochs_decay: int = 200
    epoch_count: int = 1
    max_iters: int | None = None  # stop early (benchmarks, smoke runs)
    seed: int = 0
    # auto: bf16 autocast where the device has native bf16 kernels (CUDA, AVX-512 BF16/AMX CPUs).
    amp: Literal["auto", "none", "bf16"] = "auto"
    # NHWC layout: measured 0.83-0.94x in fp32 and no gain in bf16 on a 2-core AVX-512 CPU (docs/benchmarks.md);
    # GPUs with tensor cores usually gain from it.
    channels_last: bool = False
    tf32: bool = True  # CUDA only: TF32 matmuls/convs (off: exact fp32, for parity checks)
    threads: int | None = None
    device: str = "auto"
    save_latest_freq: int = 5000
    save_epoch_freq: int = 50
    print_freq: int = 10
    sample_freq: int = 400
    eval_every: int = 0  # iterations between validation FID/KID runs (0: never; needs data.val_size)
    # Side at which validation translates the held-out images (None: the crop size). A model
    # trained on crops of full-size photos (load 286) is only judged at its own scale at 256.
    val_side: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.model.model == "simdcl" and (self.data.batch_size != 1 or self.data.crop_size < 64):
            # Its heads read exactly 256 patches x 256 features of one image per layer (spec 9.1).
            raise ValueError("SimDCL needs --batch-size 1 and --crop-size >= 64")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        for name in ("print_freq", "sample_freq", "save_latest_freq", "save_epoch_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (iterations or epochs between events)")
        if self.n_epochs < 0 or self.n_epochs_decay < 0 or (self.max_iters is not None and self.max_iters < 0):
            raise ValueError("n_epochs, n_epochs_decay and max_iters must be >= 0")
        if self.eval_every and self.data.val_size < 2:
            raise ValueError("--eval-every needs a validation set: --val-size of at least 2 images per domain")
        if self.val_side is not None and (self.val_side % 4 or self.val_side < 8):
            raise ValueError("val_side must be a multiple of 4 and at least 8 (the generator's contract)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        model = ModelConfig.from_dict(raw.pop("model"))
        optim = dict(raw.pop("optim"))
        if optim.get("head_betas") is not None:
            optim["head_betas"] = tuple(optim["head_betas"])
        return cls(model=model, optim=OptimConfig(**optim), data=DataConfig(**raw.pop("data")), **raw)
