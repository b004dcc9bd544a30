"""What the machine computes natively, for the stages that choose a number format.

Stage: shared. In: nothing (torch's view of this CPU). Out: whether bfloat16 is native here; the
note encoder (``features.note_embeddings``) and the model's scoring (``models.training``) use
bfloat16 only then, since elsewhere it is emulated and slower than float32.
"""

from __future__ import annotations


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles).

    Without them torch emulates bfloat16: MiniLM embedded notes about 3x slower in bfloat16 than
    in float32 on an AVX512F CPU without AVX512-BF16 (21 against 64 notes/s), and 1.1-3x faster
    with them. The checks are torch's own (private in torch 2.13, hence looked up by name).
    """
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)
