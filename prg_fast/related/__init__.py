"""The two related systems of PRG's source papers, on prg_fast's pretrained flows (their module
docs say how): RepFusion (arXiv 2308.10916; `prg-fast repfusion`, repfusion.repfusion) distils a
layer of the frozen velocity network into a ResNet student, then finetunes it; GenRep (ICLR 2022;
`prg-fast genrep`, genrep.genrep) learns by SimCLR on views generated with prg_fast.generate.
"""
from . import common, genrep, repfusion
from .common import ENCODERS, ResNet, ViewAugment, build_encoder
from .genrep import GenRepConfig, generate_views, neighbour_latents, nt_xent_loss
from .repfusion import (FeatureHook, RepFusionConfig, TeacherFeatures, TimestepPolicy, distill_loss,
                        entropy_weight, reinforce_loss)

__all__ = ["repfusion", "genrep", "RepFusionConfig", "FeatureHook", "TeacherFeatures",
           "TimestepPolicy", "reinforce_loss", "distill_loss", "entropy_weight",
           "GenRepConfig", "nt_xent_loss", "neighbour_latents", "generate_views",
           "ResNet", "ENCODERS", "build_encoder", "ViewAugment"]
