"""Configuration of the cohortcast fusion transformer.

Stage: model. In: vocabulary sizes and architecture settings. Out: a ``FusionConfig``
(``transformers.PretrainedConfig``) saved as ``config.json`` next to the weights, so a model folder
says exactly what it was built for.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from features.errors import ModelSettingsError

MODALITIES = ("ehr", "notes", "genomics", "imaging")
"""Token families, in the order of the modality embedding table."""


class FusionConfig(PretrainedConfig):  # type: ignore[misc]
    """Architecture of :class:`~models.fusion.modeling_fusion.FusionForRiskPrediction`.

    Parameters
    ----------
    event_vocab_size
        Coded-event tokens (EHR facts, variants, expression features), index 0 for padding.
    n_value_bins
        Quantile bins of numeric values per code; index 0 means "no value".
    text_embedding_dim
        Width of the note embeddings (384 for MiniLM-L6).
    imaging_embedding_dim
        Width of the site's image embeddings.
    n_imaging_modalities
        DICOM modalities known to the model, index 0 for unknown.
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size
        Transformer encoder size; ``hidden_size`` must be divisible by ``num_attention_heads``.
        Two heads by default: on CPU, attention costs about the same per head whatever its width
        (4 heads of 16 took 1.6x the time of 2 of 32), and 2 heads scored as well or better on the
        simulated hospital (held-out AUROC 0.684 against 0.669 with 4, 10,000 patients).
    dropout
        Dropout inside the encoder and heads.
    modality_dropout
        Probability, per patient and modality, of hiding the whole modality during training, so
        the model copes with patients who lack it.
    survival_bin_edges_days
        Right edges of the discrete-time survival intervals (increasing, in days).
    horizon_days
        Horizon of the risk head; must be one of ``survival_bin_edges_days``.
    numeric_value_embedding
        Also embed each coded event's continuous value (``event_values``, standardised, NaN when it
        has none) as ``value * w_code``, one learned vector per code (the numerical embedding of
        FT-Transformer): the value bins give a step function of the value, this a trend that
        neighbouring bins share. Off by default (the model then takes no ``event_values``).
    modality_summary
        Add to the pooled ``[CLS]`` vector a linear map of each modality's mean token (a late-fusion
        path beside the attention). A patient's notes each carry the same underlying severity with
        their own noise, so their mean is the best single estimate of it; attention from one
        ``[CLS]`` token shared with hundreds of EHR events dilutes that mean, the direct path does
        not.
    """

    model_type = "cohortcast_fusion"

    def __init__(
        self,
        event_vocab_size: int = 2,
        n_value_bins: int = 11,
        text_embedding_dim: int = 384,
        imaging_embedding_dim: int = 64,
        n_imaging_modalities: int = 1,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 256,
        dropout: float = 0.1,
        modality_dropout: float = 0.15,
        survival_bin_edges_days: tuple[float, ...] | list[float] = (30, 90, 180, 270, 365, 540, 730),
        horizon_days: float = 365,
        initializer_range: float = 0.02,
        numeric_value_embedding: bool = False,
        modality_summary: bool = True,
        **kwargs: Any,
    ) -> None:
        sizes = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
                 "num_attention_heads": num_attention_heads, "intermediate_size": intermediate_size}
        for name, size in sizes.items():
            if size < 1:
                raise ModelSettingsError(f"FusionConfig: {name} {size} (expected at least 1)")
        if hidden_size % num_attention_heads != 0:
            raise ModelSettingsError(
                f"FusionConfig: hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                f"({num_attention_heads}): each head attends over hidden_size / heads dimensions; use a number "
                f"of heads that divides {hidden_size} ({_divisors(hidden_size)})"
            )
        edges = [float(e) for e in survival_bin_edges_days]
        if not edges or any(b <= a for a, b in zip([0.0, *edges], edges, strict=False)):
            raise ModelSettingsError(f"survival_bin_edges_days must be positive and increasing (got {edges})")
        if float(horizon_days) not in edges:
            raise ModelSettingsError(f"horizon_days ({horizon_days}) must be one of survival_bin_edges_days {edges}")
        if not 0.0 <= modality_dropout < 1.0:
            raise ModelSettingsError(f"modality_dropout must be in [0, 1) (got {modality_dropout})")
        self.event_vocab_size = event_vocab_size
        self.n_value_bins = n_value_bins
        self.text_embedding_dim = text_embedding_dim
        self.imaging_embedding_dim = imaging_embedding_dim
        self.n_imaging_modalities = n_imaging_modalities
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.modality_dropout = modality_dropout
        self.survival_bin_edges_days = edges
        self.horizon_days = float(horizon_days)
        self.initializer_range = initializer_range
        self.numeric_value_embedding = bool(numeric_value_embedding)
        self.modality_summary = bool(modality_summary)
        super().__init__(**kwargs)

    @property
    def horizon_bin(self) -> int:
        """Index of the survival interval that ends at the horizon."""
        return int(self.survival_bin_edges_days.index(self.horizon_days))


def _divisors(n: int, most: int = 6) -> str:
    """The first ``most`` divisors of ``n`` as text, for an error message."""
    found = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, found[:most])) + (", ..." if len(found) > most else "")
