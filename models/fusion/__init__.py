"""The fusion transformer, in the ``transformers`` layout (configuration and modeling modules)."""

from models.fusion.configuration_fusion import MODALITIES, FusionConfig
from models.fusion.modeling_fusion import (
    FusionEncoder,
    FusionForRiskPrediction,
    FusionOutput,
    FusionPreTrainedModel,
    survival_curve,
)

__all__ = [
    "MODALITIES",
    "FusionConfig",
    "FusionEncoder",
    "FusionForRiskPrediction",
    "FusionOutput",
    "FusionPreTrainedModel",
    "survival_curve",
]
