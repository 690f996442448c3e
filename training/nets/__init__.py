"""Networks of DCLGAN/SimDCL with the authors' state-dict layout."""

from training.nets.discriminator import NLayerDiscriminator
from training.nets.generator import ResnetGenerator
from training.nets.heads import MappingF, PatchSampleF

__all__ = ["MappingF", "NLayerDiscriminator", "PatchSampleF", "ResnetGenerator"]
