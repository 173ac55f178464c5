"""The CUDA paths, where a CUDA device exists (marker `gpu`; skipped on CPU-only machines, which the
autoscaling tests cover with nodes that advertise a GPU they do not have). bench/gpu_check.sh checks
more on a CUDA machine without Ray (planner vs allocator, FSDP parity, QLoRA's gradient guard)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_the_device_module_sees_the_gpu_and_auto_resolves_to_it():
    from frugalray.devices import ClusterDevices, NodeType, local_devices, resolve_dtype, resolve_placement

    here = local_devices()
    assert here.cuda and here.cuda_memory_bytes and here.cuda_name
    node = NodeType("this", {"CPU": 4.0, "GPU": float(here.cuda_count)}, max_nodes=1, running=1)
    placement = resolve_placement("auto", count=1, cluster=ClusterDevices(running=(node,)), stage="finetune")
    assert placement.use_gpu and placement.ray_resources() == {"CPU": 1.0, "GPU": 1.0}
    assert resolve_dtype("auto", "cuda", fast_bf16=here.cuda_bf16) == ("bfloat16" if here.cuda_bf16 else "float32")


def test_lora_trains_on_cuda_in_the_resolved_dtype(default_model_path):
    from frugalray.devices import local_devices
    from frugalray.train.loop import TrainingSession
    from frugalray.train.spec import TrainingSpec

    rows = [{"prompt": f"What is {a} + 2?", "response": str(a + 2)} for a in range(16)]
    spec = TrainingSpec(method="lora", lora_rank=4, max_steps=3, batch_size=4, seq_len=48, learning_rate=1e-3,
                        device="cuda")
    session = TrainingSession(spec, default_model_path, rows, rows[:4], device="cuda")
    losses = [session.step().loss for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    assert session.compute_dtype == ("bfloat16" if local_devices().cuda_bf16 else "float32")
    assert next(p for p in session.model.parameters() if p.requires_grad).device.type == "cuda"
