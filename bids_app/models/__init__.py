"""Networks (weights only). Re-exported here: the 3D VQ-GAN autoencoder, its quantiser, discriminators and
tiled decoding; other networks are imported from their own modules."""
from bids_app.models.discriminators import (
    DiscriminatorConfig,
    PatchDiscriminator2D,
    PatchDiscriminator3D,
    SliceSelection,
    build_discriminators,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    random_slices,
    take_slices,
)
from bids_app.models.quantizer import CodebookStatistics, QuantizerOutput, VectorQuantizer
from bids_app.models.tiling import Tile, decode_with_tiles, plan_tiles
from bids_app.models.vqgan import PRESETS, VQGAN, VQGANConfig, VQGANOutput, default_config, tiny_config

__all__ = [
    "CodebookStatistics",
    "DiscriminatorConfig",
    "PRESETS",
    "PatchDiscriminator2D",
    "PatchDiscriminator3D",
    "QuantizerOutput",
    "SliceSelection",
    "Tile",
    "VQGAN",
    "VQGANConfig",
    "VQGANOutput",
    "VectorQuantizer",
    "build_discriminators",
    "decode_with_tiles",
    "default_config",
    "feature_matching_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "plan_tiles",
    "random_slices",
    "take_slices",
    "tiny_config",
]
