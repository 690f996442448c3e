"""DCL and SimDCL: networks and their losses (spec sections 5-9); training/step.py trains on the losses.

Paper <-> authors' code <-> here:

    G : X->Y    netG_A   gen_ab     translates domain A to B
    F : Y->X    netG_B   gen_ba     translates B to A
    D_Y         netD_A   disc_b     judges domain-B images (real_b vs fake_b)
    D_X         netD_B   disc_a     judges domain-A images
    H_X         netF1    head_a     projects G_A-encoder features of A-domain images
    H_Y         netF2    head_b     projects G_B-encoder features of B-domain images
    H_xr..H_xf  netF3-6  sim_*      SimDCL similarity heads (real A, fake B, real B, fake A)

``OFFICIAL_NAMES`` maps the authors' checkpoint names to these attributes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from training.config import ModelConfig, OptimConfig
from training.losses import gan_loss, identity_l1, patch_nce, similarity_l1
from training.nets import MappingF, NLayerDiscriminator, PatchSampleF, ResnetGenerator

OFFICIAL_NAMES = {
    "G_A": "gen_ab",
    "G_B": "gen_ba",
    "D_A": "disc_b",
    "D_B": "disc_a",
    "F1": "head_a",
    "F2": "head_b",
    "F3": "sim_real_a",
    "F4": "sim_fake_b",
    "F5": "sim_real_b",
    "F6": "sim_fake_a",
}

PatchIds = Sequence[torch.Tensor]
# The ids of every head call that draws patch positions, in call order: replaces the random draws
# (tests replay the authors' recorded ids). DCL draws twice per G loss, SimDCL four times.
IdDraws = Iterator[PatchIds]


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """The authors' init: Xavier-normal (gain 0.02) for every Conv/Linear weight, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class Translations:
    """The generator outputs of one iteration, plus the encoder features the forward pass made."""

    fake_b: torch.Tensor
    fake_a: torch.Tensor
    idt_a: torch.Tensor | None  # gen_ab(real_b)
    idt_b: torch.Tensor | None  # gen_ba(real_a)
    feats_real_a: list[torch.Tensor]  # gen_ab's encoder on real_a: the keys of NCE A->B
    feats_real_b: list[torch.Tensor]


@dataclass
class Contrast:
    """One PatchNCE direction: per-layer means and the rows SimDCL reuses."""

    per_layer: torch.Tensor  # (L,)
    key_rows: list[torch.Tensor]
    query_feats: list[torch.Tensor]
    fresh_query_rows: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Optimizers:
    g: torch.optim.Optimizer
    d: torch.optim.Optimizer
    f: torch.optim.Optimizer

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.g, self.d, self.f]


class DCLTask(nn.Module):
    """DCLGAN: two generators, two PatchGANs, two projection heads, dual PatchNCE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gen_ab = ResnetGenerator(cfg.input_nc, cfg.output_nc, cfg.ngf, cfg.n_blocks)
        self.gen_ba = ResnetGenerator(cfg.output_nc, cfg.input_nc, cfg.ngf, cfg.n_blocks)
        self.disc_b = NLayerDiscriminator(cfg.output_nc, cfg.ndf, cfg.n_layers_d)
        self.disc_a = NLayerDiscriminator(cfg.input_nc, cfg.ndf, cfg.n_layers_d)
        self.head_a = PatchSampleF(cfg.netf_nc)
        self.head_b = PatchSampleF(cfg.netf_nc)

    # DCL weights NCE by lambda_nce and identity by lambda_idt; SimDCL overrides both with 1.
    def nce_weight(self) -> float:
        return float(self.cfg.lambda_nce)  # ModelConfig sets it for DCL

    def idt_weight(self) -> float:
        return float(self.cfg.lambda_idt)

    # -- construction -------------------------------------------------------------------
    def build_heads(self, image_size: int = 64) -> None:
        """Create the heads' MLPs from the encoder widths (the authors do this lazily)."""
        device = next(self.gen_ab.parameters()).device
        with torch.no_grad():
            probe = torch.zeros(1, self.cfg.input_nc, image_size, image_size, device=device)
            channels = [f.shape[1] for f in self.gen_ab.encode(probe, self.cfg.nce_layers)]
        for head in (self.head_a, self.head_b):
            if not head.built:
                head.build(channels, device)

    def initialize(self) -> None:
        """Fresh training init; call after build_heads."""
        for net in self.networks().values():
            init_weights(net)

    def networks(self) -> dict[str, nn.Module]:
        """Modules by the authors' checkpoint names (G_A, G_B, D_A, D_B, F1, F2, ...)."""
        return {
            official: getattr(self, attr) for official, attr in OFFICIAL_NAMES.items() if hasattr(self, attr)
        }

    def generators(self) -> list[nn.Module]:
        return [self.gen_ab, self.gen_ba]

    def discriminators(self) -> list[nn.Module]:
        return [self.disc_a, self.disc_b]

    def head_modules(self) -> list[nn.Module]:
        return [self.head_a, self.head_b]

    def make_optimizers(self, cfg: OptimConfig) -> Optimizers:
        """Adam for G, D and all heads; the heads must be built first, or Adam would never see them."""
        if not all(head.built for head in (self.head_a, self.head_b)):
            raise RuntimeError("build_heads() must run before make_optimizers()")
        betas = (cfg.beta1, cfg.beta2)
        head_lr, head_betas = cfg.head_hparams(self.cfg.model)
        gens = [p for m in self.generators() for p in m.parameters()]
        discs = [p for m in self.discriminators() for p in m.parameters()]
        heads = [p for m in self.head_modules() for p in m.parameters()]
        return Optimizers(
            g=torch.optim.Adam(gens, lr=cfg.lr, betas=betas),
            d=torch.optim.Adam(discs, lr=cfg.lr, betas=betas),
            f=torch.optim.Adam(heads, lr=head_lr, betas=head_betas),
        )

    # -- forward and losses ------------------------------------------------------------
    def translate(self, real_a: torch.Tensor, real_b: torch.Tensor) -> Translations:
        """G_A on [real_a; real_b] and G_B on [real_b; real_a] in one batched pass each.

        InstanceNorm is per image, so batching the identity pass with the translation is
        exact; the pass also yields the key-side NCE features (keys are detached in the loss,
        so reusing them changes no number).
        """
        n = real_a.shape[0]
        with_idt = self.idt_weight() > 0
        layers = self.cfg.nce_layers
        in_ab = torch.cat([real_a, real_b]) if with_idt else real_a
        in_ba = torch.cat([real_b, real_a]) if with_idt else real_b
        out_ab, feats_ab = self.gen_ab.forward_with_features(in_ab, layers)
        out_ba, feats_ba = self.gen_ba.forward_with_features(in_ba, layers)
        return Translations(
            fake_b=out_ab[:n],
            fake_a=out_ba[:n],
            idt_a=out_ab[n:] if with_idt else None,
            idt_b=out_ba[n:] if with_idt else None,
            feats_real_a=[f[:n] for f in feats_ab],
            feats_real_b=[f[:n] for f in feats_ba],
        )

    def d_losses(self, real_a: torch.Tensor, real_b: torch.Tensor, tr: Translations) -> dict[str, torch.Tensor]:
        """0.5 * (real + fake) per discriminator, fakes detached; real and fake in one batch."""
        mode = self.cfg.gan_mode

        def one(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
            logits = disc(torch.cat([real, fake.detach()]))
            n = real.shape[0]
            return 0.5 * (gan_loss(logits[:n], True, mode) + gan_loss(logits[n:], False, mode))

        return {"d/b": one(self.disc_b, real_b, tr.fake_b), "d/a": one(self.disc_a, real_a, tr.fake_a)}

    def contrast(
        self,
        key_feats: list[torch.Tensor],
        fake: torch.Tensor,
        key_head: PatchSampleF,
        query_gen: ResnetGenerator,
        query_head: PatchSampleF,
        draws: IdDraws | None = None,
    ) -> Contrast:
        """PatchNCE for one direction: the query is the fake through the *other* generator's
        encoder and head; the key head draws the patch ids and the query reuses them."""
        n = self.cfg.num_patches
        key_rows, ids = key_head(key_feats, n, next(draws) if draws is not None else None)
        query_feats = query_gen.encode(fake, self.cfg.nce_layers)
        query_rows, _ = query_head(query_feats, n, ids)
        per_layer = torch.stack(
            [patch_nce(q, k, self.cfg.nce_t).mean() for q, k in zip(query_rows, key_rows, strict=True)]
        )
        return Contrast(per_layer=per_layer, key_rows=key_rows, query_feats=query_feats)

    def g_losses(
        self,
        real_a: torch.Tensor,
        real_b: torch.Tensor,
        tr: Translations,
        drawn_ids: Sequence[PatchIds] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generator objective against the current discriminators (spec 8.3 / 9.3).

        ``drawn_ids`` optionally replaces the random patch draws, in call order (see ``IdDraws``);
        all of them must be used.
        """
        cfg = self.cfg
        draws = iter(drawn_ids) if drawn_ids is not None else None
        losses = {
            "g/gan_ab": cfg.lambda_gan * gan_loss(self.disc_b(tr.fake_b), True, cfg.gan_mode),
            "g/gan_ba": cfg.lambda_gan * gan_loss(self.disc_a(tr.fake_a), True, cfg.gan_mode),
        }
        ab = self.contrast(tr.feats_real_a, tr.fake_b, self.head_a, self.gen_ba, self.head_b, draws)
        ba = self.contrast(tr.feats_real_b, tr.fake_a, self.head_b, self.gen_ab, self.head_a, draws)
        if draws is not None and next(draws, None) is not None:
            raise ValueError("drawn_ids holds more draws than this model makes")
        losses["g/nce_ab"] = self.nce_weight() * ab.per_layer.mean()
        losses["g/nce_ba"] = self.nce_weight() * ba.per_layer.mean()
        total = 0.5 * (losses["g/gan_ab"] + losses["g/gan_ba"]) + 0.5 * (losses["g/nce_ab"] + losses["g/nce_ba"])
        if tr.idt_a is not None and tr.idt_b is not None:
            losses["g/idt_a"] = self.idt_weight() * identity_l1(tr.idt_a, real_b)
            losses["g/idt_b"] = self.idt_weight() * identity_l1(tr.idt_b, real_a)
            total = total + 0.5 * (losses["g/idt_a"] + losses["g/idt_b"])
        extra = self.extra_g_losses(ab, ba)
        losses.update(extra)
        losses["g/total"] = total + sum(extra.values(), torch.zeros((), device=total.device))
        losses["nce_per_layer"] = torch.cat([ab.per_layer, ba.per_layer]).detach()
        return losses

    def extra_g_losses(self, ab: Contrast, ba: Contrast) -> dict[str, torch.Tensor]:
        """Hook for model-specific generator terms (SimDCL's similarity loss)."""
        return {}


class SimDCLTask(DCLTask):
    """SimDCL: DCL plus four similarity heads that pull real and fake of one domain together.

    As in the authors' code, its NCE and identity terms carry no lambda (spec 9.3), the extra
    fake-side head calls draw fresh patch ids, and the real-side rows are the NCE keys *before*
    the loss detaches them.
    """

    def nce_weight(self) -> float:
        return 1.0

    def idt_weight(self) -> float:
        return 1.0

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.sim_real_a, self.sim_fake_b = MappingF(len(cfg.nce_layers)), MappingF(len(cfg.nce_layers))
        self.sim_real_b, self.sim_fake_a = MappingF(len(cfg.nce_layers)), MappingF(len(cfg.nce_layers))

    def head_modules(self) -> list[nn.Module]:
        return [self.head_a, self.head_b, self.sim_real_a, self.sim_fake_b, self.sim_real_b, self.sim_fake_a]

    def contrast(
        self,
        key_feats: list[torch.Tensor],
        fake: torch.Tensor,
        key_head: PatchSampleF,
        query_gen: ResnetGenerator,
        query_head: PatchSampleF,
        draws: IdDraws | None = None,
    ) -> Contrast:
        result = super().contrast(key_feats, fake, key_head, query_gen, query_head, draws)
        # Same query features, fresh patch ids (spec 9.2): the fake side of the similarity loss.
        fresh_ids = next(draws) if draws is not None else None
        result.fresh_query_rows, _ = query_head(result.query_feats, self.cfg.num_patches, fresh_ids)
        return result

    def extra_g_losses(self, ab: Contrast, ba: Contrast) -> dict[str, torch.Tensor]:
        real_a = self.sim_real_a(torch.stack(ab.key_rows))
        fake_b = self.sim_fake_b(torch.stack(ab.fresh_query_rows))
        real_b = self.sim_real_b(torch.stack(ba.key_rows))
        fake_a = self.sim_fake_a(torch.stack(ba.fresh_query_rows))
        return {"g/sim": self.cfg.lambda_sim * (similarity_l1(real_a, fake_a) + similarity_l1(fake_b, real_b))}


def build_task(cfg: ModelConfig) -> DCLTask:
    return SimDCLTask(cfg) if cfg.model == "simdcl" else DCLTask(cfg)


def iter_official_state(task: DCLTask) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(official name, CPU state dict) pairs, as the authors save ``<label>_net_<name>.pth``."""
    for name, net in task.networks().items():
        yield name, {k: v.detach().cpu() for k, v in net.state_dict().items()}
