"""Keep bitsandbytes 4-bit layers trainable on CPUs with AVX512-BF16.

bitsandbytes 0.50's `Linear4bit.forward` repacks a layer's 4-bit weights into a CPU format
"optimized for AVX512BF16" the first time the layer runs in eval mode with an input that needs
no grad, on any CPU whose flags include avx512_bf16. Nothing packs them back when training
resumes (only saving does), and from then on the layer's matmul runs `gemv_4bit`, which has no
autograd: the gradient through the layer is silently dropped (torch only warns "an autograd
kernel was not registered"). Every layer before it then trains on cut gradients. The repack
also rewrites the quantization constants (absmax to bf16, double quantization undone), so the
packed layer no longer computes quite what training did.

A model that trains is never allowed to repack: `keep_4bit_weights_unpacked` clears the
per-layer flag that enables the repack (set once, at the layer's construction), and
`packed_4bit_layers` lets the training loop check, before every step, that nothing packed a
layer behind its back. Inference-only 4-bit models (which never train) may keep the fast path.
"""

from __future__ import annotations

from typing import Any

# The per-layer attribute bitsandbytes reads in Linear4bit.forward before repacking (0.48-0.50).
REPACK_FLAG = "support_avx512bf16_for_cpu"


def _linear4bit_class():
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:  # noqa: BLE001 - no bitsandbytes: no 4-bit layers to look after
        return None
    return Linear4bit


def four_bit_layers(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of every bitsandbytes Linear4bit in `model`."""
    cls = _linear4bit_class()
    if cls is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def is_packed(layer: Any) -> bool:
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_4bit_weights_unpacked(model: Any) -> int:
    """Turn off the CPU repack on every 4-bit layer of a model that will train; returns the count.

    Raises if a layer is packed already: its constants were rewritten, so it no longer holds the
    weights the model was quantized to, and unpacking would not give them back exactly.
    """
    layers = four_bit_layers(model)
    packed = [name for name, layer in layers if is_packed(layer)]
    if packed:
        raise RuntimeError(
            f"{len(packed)} 4-bit layers (e.g. {packed[0]}) were already repacked for CPU inference "
            "(an eval-mode forward before training); load the model again for training"
        )
    for _, layer in layers:
        setattr(layer, REPACK_FLAG, False)
    return len(layers)


def packed_4bit_layers(model: Any) -> list[str]:
    """Names of 4-bit layers a training step must not run on: packed, or still allowed to repack."""
    return [name for name, layer in four_bit_layers(model) if is_packed(layer) or getattr(layer, REPACK_FLAG, False)]
