"""The cohortcast fusion transformer: EHR events, notes, genomics and imaging in one encoder.

Stage: model. In: one padded batch of a patient's tokens per modality, all dated before the
prediction time (see :class:`~models.data.FusionBatch`). Out: a :class:`FusionOutput` with the risk
logit at the horizon, discrete-time hazard logits (the survival curve) and the outcome logit under
each treatment arm (the individual treatment effect), plus the training loss when labels are given.

Each modality becomes tokens of width ``hidden_size``:

* coded event (EHR facts, and genomics: variants and expression features are coded tokens whose
  genotype or value is binned): code embedding + value-bin embedding + an embedding of the
  (code, value bin) pair + time-before-prediction encoding (static facts such as genotype sit at
  time zero); with ``numeric_value_embedding``, plus the continuous value times a learned vector
  of its code;
* note: projected text-encoder embedding + time encoding;
* imaging study: projected image embedding + DICOM-modality embedding + time encoding.

A modality embedding (ehr, notes, genomics, imaging) is added to every token, a learned ``[CLS]``
token is prepended, and a stack of pre-norm transformer blocks (PyTorch scaled-dot-product attention
with a key-padding mask) mixes them. The pooled vector is the ``[CLS]`` output plus a linear map of
each modality's mean input token (``modality_summary``), so the average of many noisy notes or
images reaches the heads directly. A missing modality is simply absent: its tokens are padding,
never zero-filled fakes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as hf_init
from transformers.utils.generic import ModelOutput

from models.fusion.configuration_fusion import MODALITIES, FusionConfig

TIME_BUCKET_EDGES_DAYS = (1.0, 7.0, 30.0, 91.0, 182.0, 365.0, 730.0, 1826.0, 3652.0)


@dataclass
class FusionOutput(ModelOutput):  # type: ignore[misc]
    """What the model returns; tensors are ``None`` when not computed."""

    loss: torch.Tensor | None = None
    risk_logits: torch.Tensor | None = None  # (B,)
    hazard_logits: torch.Tensor | None = None  # (B, K) one per survival interval
    arm_logits: torch.Tensor | None = None  # (B, 2) outcome logit if untreated, if treated
    pooled: torch.Tensor | None = None  # (B, H)


class TimeEncoding(nn.Module):
    """Embed how long before the prediction time a token was recorded, in clinical time buckets.

    Buckets (same day, a week, a month, a quarter, half a year, a year, two, five, ten years,
    older) keep neighbouring days together and separate what matters clinically; a learned
    embedding per bucket starts as small as the code embeddings, so time refines a token's meaning
    instead of drowning it (continuous sinusoidal features did, and the model then learned nothing).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(len(TIME_BUCKET_EDGES_DAYS) + 1, hidden_size)

    def forward(self, days: torch.Tensor) -> torch.Tensor:
        # days: (B, L) >= 0  ->  (B, L, H)
        edges = torch.tensor(TIME_BUCKET_EDGES_DAYS, dtype=days.dtype, device=days.device)
        return self.embedding(torch.bucketize(days.clamp(min=0.0).contiguous(), edges))


class SelfAttention(nn.Module):
    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, T, H), mask: (B, T) True for real tokens
        b, t, h = x.shape
        q, k, v = self.qkv(x).split(h, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, h // self.n_heads).transpose(1, 2) for z in (q, k, v))
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T): every query sees only real keys
        # No dropout on the attention weights: it would force PyTorch's slow reference kernel
        # (5x slower training on CPU); dropout stays on the residual branches.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask
        )  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(b, t, h))


class Block(nn.Module):
    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class FusionPreTrainedModel(PreTrainedModel):  # type: ignore[misc]
    """Weight initialisation and ``save_pretrained`` / ``from_pretrained`` for fusion models."""

    config_class = FusionConfig
    base_model_prefix = "encoder"
    main_input_name = "event_codes"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FusionEncoder):
            # transformers' init helpers skip weights already loaded from a checkpoint.
            hf_init.normal_(module.cls_token, std=self.config.initializer_range)


class FusionEncoder(FusionPreTrainedModel):
    """Turn every modality into tokens and pool them into one vector per patient."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.event_code = nn.Embedding(config.event_vocab_size, h, padding_idx=0)
        self.event_value = nn.Embedding(config.n_value_bins, h, padding_idx=0)
        # A bin means something different for every code (the top quintile of troponin is not that
        # of haemoglobin), so each (code, bin) pair also has its own embedding; row 0 is "no value".
        self.event_code_value = nn.Embedding(config.event_vocab_size * config.n_value_bins, h, padding_idx=0)
        # Optional (config.numeric_value_embedding): value * a vector per code, a trend across bins.
        self.event_code_slope = (nn.Embedding(config.event_vocab_size, h, padding_idx=0)
                                 if config.numeric_value_embedding else None)
        self.note_proj = nn.Linear(config.text_embedding_dim, h)
        self.imaging_proj = nn.Linear(config.imaging_embedding_dim, h)
        self.imaging_modality = nn.Embedding(config.n_imaging_modalities, h)
        self.time = TimeEncoding(h)
        self.modality = nn.Embedding(len(MODALITIES), h)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        # Optional (config.modality_summary): each modality's mean token, mapped into the pooled vector.
        self.summary = nn.Linear(len(MODALITIES) * h, h) if config.modality_summary else None
        self.ln_f = nn.LayerNorm(h)
        self.post_init()

    def drop_modalities(self, token_modalities: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hide whole modalities at random (training only), never all of a patient's tokens.

        token_modalities, mask: (B, T). Returns the new mask (B, T).
        """
        p = self.config.modality_dropout
        if not self.training or p == 0.0:
            return mask
        b = mask.shape[0]
        keep_modality = torch.rand(b, len(MODALITIES), device=mask.device) >= p  # (B, M)
        dropped = mask & keep_modality.gather(1, token_modalities)  # (B, T)
        has_any = dropped.any(dim=1, keepdim=True)  # (B, 1)
        return torch.where(has_any, dropped, mask)

    def forward(
        self,
        event_codes: torch.Tensor,  # (B, Le) long, 0 = padding
        event_value_bins: torch.Tensor,  # (B, Le) long, 0 = no value
        event_days: torch.Tensor,  # (B, Le) float, days before prediction
        event_modalities: torch.Tensor,  # (B, Le) long, index into MODALITIES
        event_mask: torch.Tensor,  # (B, Le) bool
        note_embeddings: torch.Tensor,  # (B, Ln, Dt)
        note_days: torch.Tensor,  # (B, Ln)
        note_mask: torch.Tensor,  # (B, Ln) bool
        imaging_embeddings: torch.Tensor,  # (B, Li, Di)
        imaging_modalities: torch.Tensor,  # (B, Li) long, DICOM modality ids
        imaging_days: torch.Tensor,  # (B, Li)
        imaging_mask: torch.Tensor,  # (B, Li) bool
        event_values: torch.Tensor | None = None,  # (B, Le) float, NaN = no value; read when configured
    ) -> torch.Tensor:
        b = event_codes.shape[0]
        code_value = torch.where(event_value_bins > 0, event_codes * self.config.n_value_bins + event_value_bins, 0)
        events = (
            self.event_code(event_codes) + self.event_value(event_value_bins) + self.event_code_value(code_value)
            + self.time(event_days) + self.modality(event_modalities)
        )  # (B, Le, H)
        if self.event_code_slope is not None:
            if event_values is None:
                raise ValueError("FusionEncoder.forward: config.numeric_value_embedding is set, so event_values "
                                 "(B, Le) are expected (found None)")
            values = torch.nan_to_num(event_values.to(events.dtype), nan=0.0)  # no value: no trend term
            events = events + values.unsqueeze(-1) * self.event_code_slope(event_codes)
        notes = self.note_proj(note_embeddings) + self.time(note_days)  # (B, Ln, H)
        imaging = (
            self.imaging_proj(imaging_embeddings) + self.imaging_modality(imaging_modalities)
            + self.time(imaging_days)
        )  # (B, Li, H)
        note_modality = torch.full_like(note_mask, MODALITIES.index("notes"), dtype=torch.long)
        imaging_modality = torch.full_like(imaging_mask, MODALITIES.index("imaging"), dtype=torch.long)
        notes = notes + self.modality(note_modality)
        imaging = imaging + self.modality(imaging_modality)
        token_modalities = torch.cat([event_modalities, note_modality, imaging_modality], dim=1)  # (B, T)
        mask = self.drop_modalities(token_modalities, torch.cat([event_mask, note_mask, imaging_mask], dim=1))
        x = torch.cat([self.cls_token.expand(b, -1, -1), events, notes, imaging], dim=1)  # (B, 1 + T, H)
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), mask], dim=1)
        x = self.drop(x)
        summary = self.modality_means(x[:, 1:], token_modalities, mask[:, 1:]) if self.summary is not None else None
        for block in self.blocks:
            x = block(x, mask)
        pooled = x[:, 0]  # (B, H): the [CLS] token
        if self.summary is not None and summary is not None:
            pooled = pooled + self.summary(summary)
        return self.ln_f(pooled)

    @staticmethod
    def modality_means(tokens: torch.Tensor, token_modalities: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean token of each modality, zeros for a modality the patient lacks (or had dropped).

        tokens: (B, T, H); token_modalities, mask: (B, T). Returns (B, M * H), modalities in order.
        """
        member = F.one_hot(token_modalities, len(MODALITIES)).to(tokens.dtype) * mask.unsqueeze(-1)  # (B, T, M)
        counts = member.sum(dim=1).clamp(min=1.0)  # (B, M)
        means = torch.bmm(member.transpose(1, 2), tokens) / counts.unsqueeze(-1)  # (B, M, H)
        return means.flatten(1)


class FusionForRiskPrediction(FusionPreTrainedModel):
    """Fusion encoder with risk, survival and treatment-arm heads."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__(config)
        self.encoder = FusionEncoder(config)
        self.head_drop = nn.Dropout(config.dropout)
        self.risk_head = nn.Linear(config.hidden_size, 1)
        self.hazard_head = nn.Linear(config.hidden_size, len(config.survival_bin_edges_days))
        self.arm_head = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        event_codes: torch.Tensor,
        event_value_bins: torch.Tensor,
        event_days: torch.Tensor,
        event_modalities: torch.Tensor,
        event_mask: torch.Tensor,
        note_embeddings: torch.Tensor,
        note_days: torch.Tensor,
        note_mask: torch.Tensor,
        imaging_embeddings: torch.Tensor,
        imaging_modalities: torch.Tensor,
        imaging_days: torch.Tensor,
        imaging_mask: torch.Tensor,
        risk_labels: torch.Tensor | None = None,  # (B,) 0/1, NaN when unknown (censored early)
        event: torch.Tensor | None = None,  # (B,) 0/1
        duration_days: torch.Tensor | None = None,  # (B,)
        treated: torch.Tensor | None = None,  # (B,) 0/1, NaN: no treatment in the task, or no arm
        event_values: torch.Tensor | None = None,  # (B, Le) float; only with config.numeric_value_embedding
    ) -> FusionOutput:
        pooled = self.encoder(
            event_codes, event_value_bins, event_days, event_modalities, event_mask,
            note_embeddings, note_days, note_mask,
            imaging_embeddings, imaging_modalities, imaging_days, imaging_mask, event_values,
        )  # (B, H)
        # The heads and the losses run in float32 under bfloat16 autocast too: bfloat16 keeps 8 bits
        # of mantissa, which rounded 400 patients' risks to 152 distinct values, and ties at a tier's
        # cut are decided by nothing the model knows.
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            z = self.head_drop(pooled.float())
            risk_logits = self.risk_head(z).squeeze(-1)  # (B,)
            hazard_logits = self.hazard_head(z)  # (B, K)
            arm_logits = self.arm_head(z)  # (B, 2)
            loss = None
            if risk_labels is not None and event is not None and duration_days is not None:
                loss = (self.risk_loss(risk_logits, risk_labels)
                        + self.survival_loss(hazard_logits, event, duration_days.float()))
                if treated is not None:
                    loss = loss + self.arm_loss(arm_logits, risk_labels, treated)
        return FusionOutput(
            loss=loss, risk_logits=risk_logits, hazard_logits=hazard_logits, arm_logits=arm_logits, pooled=pooled
        )

    @staticmethod
    def risk_loss(risk_logits: torch.Tensor, risk_labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy over patients whose outcome at the horizon is known."""
        known = ~torch.isnan(risk_labels)
        if not known.any():
            return risk_logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(risk_logits[known], risk_labels[known])

    def survival_loss(
        self, hazard_logits: torch.Tensor, event: torch.Tensor, duration_days: torch.Tensor
    ) -> torch.Tensor:
        """Negative log-likelihood of the discrete-time hazard model, censoring-aware.

        Interval ``j`` is ``(edge[j-1], edge[j]]``. A patient whose follow-up ends in interval ``j``
        survived every interval before it; if the follow-up ended with the event, the event happened
        in ``j``. A patient censored in ``j`` also survived ``j`` when followed to at least its
        midpoint (the life-table rule, as in nnet-survival: Gensheimer and Narasimhan 2019). Left
        out of ``j`` altogether, those at risk for part of it would leave its denominator while its
        events stayed in the numerator: on the simulated hospital, whose last interval is a year
        wide, that put the two-year risk at 0.287 against a Kaplan-Meier 0.250. Follow-up beyond
        the last edge survived all.
        """
        k = hazard_logits.shape[1]
        edges = torch.tensor(self.config.survival_bin_edges_days, dtype=duration_days.dtype,
                             device=duration_days.device)
        starts = torch.cat([edges.new_zeros(1), edges[:-1]])
        midpoints = (starts + edges) / 2  # (K,)
        duration = duration_days.contiguous()
        j = torch.searchsorted(edges, duration)  # (B,), k when beyond
        intervals = torch.arange(k, device=hazard_logits.device)[None, :]  # (1, K)
        censored = event[:, None] <= 0.5
        in_last = intervals == j[:, None]  # (B, K)
        survived = ((intervals < j[:, None]) | (in_last & censored & (duration[:, None] >= midpoints))).float()
        had_event = (in_last & ~censored).float()  # (B, K)
        log_likelihood = survived * F.logsigmoid(-hazard_logits) + had_event * F.logsigmoid(hazard_logits)
        return -log_likelihood.sum(dim=1).mean()

    @staticmethod
    def arm_loss(arm_logits: torch.Tensor, risk_labels: torch.Tensor, treated: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the factual arm only: each patient shows one potential outcome."""
        known = ~torch.isnan(risk_labels) & ~torch.isnan(treated)
        if not known.any():
            return arm_logits.sum() * 0.0
        factual = arm_logits[known].gather(1, treated[known].long().unsqueeze(1)).squeeze(1)
        return F.binary_cross_entropy_with_logits(factual, risk_labels[known])


def survival_curve(hazard_logits: torch.Tensor) -> torch.Tensor:
    """Survival probability at the end of each interval: ``prod_{k<=j} (1 - h_k)``, shape (B, K)."""
    return torch.cumprod(torch.sigmoid(-hazard_logits), dim=1)
