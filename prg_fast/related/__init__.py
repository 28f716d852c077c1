"""The two related systems of PRG's source papers, on prg_fast's pretrained flows:

    prg_fast.related.repfusion   RepFusion (arXiv 2308.10916): distil a layer of the frozen velocity
                                 network at a time t (fixed, or chosen per image by a REINFORCE policy)
                                 into a ResNet student, then finetune the student (`prg-fast repfusion`;
                                 in Python: repfusion.repfusion(RepFusionConfig(...)))
    prg_fast.related.genrep      GenRep (ICLR 2022): SimCLR on anchor / neighbour views generated from
                                 nearby latents with prg_fast.generate; linear probe on real data
                                 (`prg-fast genrep`; in Python: genrep.genrep(GenRepConfig(...)))
"""
from . import common, genrep, repfusion
from .common import ENCODERS, ResNet, ViewAugment, build_encoder
from .genrep import GenRepConfig, GenRepResult, generate_views, neighbour_latents, nt_xent_loss
from .repfusion import (FeatureHook, RepFusionConfig, RepFusionResult, TeacherFeatures, TimestepPolicy, distill_loss,
                        entropy_weight, reinforce_loss)

__all__ = ["repfusion", "genrep", "RepFusionConfig", "RepFusionResult", "FeatureHook", "TeacherFeatures",
           "TimestepPolicy", "reinforce_loss", "distill_loss", "entropy_weight",
           "GenRepConfig", "GenRepResult", "nt_xent_loss", "neighbour_latents", "generate_views",
           "ResNet", "ENCODERS", "build_encoder", "ViewAugment"]
