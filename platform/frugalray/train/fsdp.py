"""FSDP2 for the training loop: shard per decoder layer, then the root.

    shard_model(model)            # inside an initialized process group (Ray Train sets one up)

Gradients are *summed* across ranks (divide factor 1): the loop normalizes each rank's
loss by the number of loss tokens in the whole global batch, so the sum over ranks is
exactly the gradient of the global token-mean loss that a single process computes.
FSDP's default (average over ranks) is also right only when every rank sees the same
number of loss tokens; with variable-length rows it weights short batches too heavily.

4-bit weights: bitsandbytes stores QLoRA weights packed into a bf16 tensor
(`bnb_4bit_quant_storage=bfloat16`), so FSDP shards and all-gathers the packed bytes like
any bf16 tensor. The quantization constants (absmax, the nested quant state) are not
parameters: every rank keeps the full `quant_state` on the `Linear4bit` module, and
`bitsandbytes.nn.modules.fix_4bit_weight_quant_state_from_module` re-attaches it to the
all-gathered weight in forward. Never give FSDP a `MixedPrecisionPolicy(param_dtype=...)`
for a 4-bit model: it would cast the packed bytes *by value* and destroy the weights.

Loading: full/LoRA ranks > 0 build on the meta device and receive their shards from rank 0
(`broadcast_from_rank0`). A 4-bit model cannot be built on meta (its layers are created by
quantizing real weights), so `load_4bit_once_per_node` has one rank per node quantize and
write the packed 4-bit checkpoint, and the node's other ranks load that: they skip the
full-precision pass (the default model: about 740 MiB of growth to quantize, 160 MiB of
4-bit file to load, bit-identical logits).
"""

from __future__ import annotations

import logging
from typing import Any

from frugalray.models import load_causal_lm

log = logging.getLogger(__name__)


def decoder_layers(model: Any) -> list[Any]:
    """The transformer blocks of an HF causal LM (PEFT-wrapped or not), by `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no decoder layers found in {type(model).__name__} (looked for {sorted(names)})")
    return layers


def shard_model(model: Any, reshard_after_forward: bool = True) -> Any:
    """Apply FSDP2 `fully_shard` to every decoder layer, then to the root module."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    # The loss is already divided by the global batch's loss tokens, so gradients must be summed over
    # ranks. Both settings are per FSDP module (its own parameter group): set on the root alone, the
    # decoder layers' gradients were averaged (LoRA grad norm half a single process's, clipping at twice
    # max_grad_norm), and a divide factor turns into NCCL's PREMUL_SUM, which gloo refuses (full fine-tuning
    # on CPU failed). Forcing plain SUM with factor 1 is exact on both backends.
    for module in [*layers, model]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    log.info("FSDP2: sharded %d decoder layers + root", len(layers))
    return model


def full_tensor(t: Any) -> Any:
    """A DTensor's full value (a collective: every rank must call it), else the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def broadcast_from_rank0(model: Any, full_state: dict[str, Any] | None, device: Any, is_meta: bool) -> None:
    """Fill every rank's shards from rank 0's full state dict (ranks > 0 built on the meta device).

    Buffers that are not in the state dict (rotary `inv_freq`) are broadcast too, since
    `to_empty` leaves them uninitialized.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if is_meta:
        model.to_empty(device=device)
    set_model_state_dict(
        model,
        full_state if dist.get_rank() == 0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    for _, buf in model.named_buffers():
        moved = buf.to(comm_device)
        dist.broadcast(moved, src=0)
        if moved is not buf:
            buf.copy_(moved)


def load_4bit_once_per_node(model_path: str, compute_dtype: str) -> Any:
    """A 4-bit model for every rank, quantized once per node (a collective: every rank calls it).

    The lowest rank on each host quantizes from the original weights and saves the result
    (safetensors: packed weights and quantization constants) to a node-local temporary
    directory; the host's other ranks load that pre-quantized checkpoint, which transformers
    reads without a full-precision copy. The directory is removed once everyone has loaded.
    """
    import shutil
    import socket
    import tempfile
    import uuid
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM


    rank, world = dist.get_rank(), dist.get_world_size()
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    leader = hosts.index(hosts[rank])  # the lowest rank on this host
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    directory = Path(tempfile.gettempdir()) / f"frugalray-4bit-{token[0]}"
    try:
        if rank == leader:
            model = load_causal_lm(model_path, quantize_4bit=True, compute_dtype=compute_dtype)
            model.save_pretrained(directory)
            log.info("rank %d quantized %s to 4 bits for its node (%s)", rank, model_path, directory)
        dist.barrier()
        if rank != leader:
            # The checkpoint's config carries the quantization settings (NF4, double quant, storage, compute dtype).
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        dist.barrier()
    finally:
        if rank == leader:
            shutil.rmtree(directory, ignore_errors=True)  # loaded tensors keep their own (unlinked) mapping
    return model
