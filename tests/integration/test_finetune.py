"""finetune on a real Ray Train cluster: QLoRA steps, a saved adapter PEFT can load, a ledger record."""

from __future__ import annotations

import json
import math

import pytest

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import parse_config
from frugalray.train.finetune import FinetuneConfig, run_finetune


def write_sum_rows(path, n: int, start: int = 0) -> str:
    with open(path, "w") as fh:
        for i in range(start, start + n):
            a, b = i % 7 + 1, i % 5 + 2
            fh.write(json.dumps({"prompt": f"What is {a} + {b}? Reply with only the number.", "response": str(a + b)}) + "\n")
    return str(path)


@pytest.mark.slow
def test_qlora_finetune_saves_a_loadable_adapter(ray_cluster, default_model_path, tmp_path):
    data = write_sum_rows(tmp_path / "train.jsonl", 16)
    cfg = parse_config(
        FinetuneConfig,
        {
            "model": default_model_path,
            "data_path": data,
            "method": "qlora",
            "lora_rank": 4,
            "lora_alpha": 8,
            "learning_rate": 1e-3,
            "max_steps": 2,
            "batch_size": 2,
            "seq_len": 48,
            "eval_rows": 2,
            "cpu_threads": 1,  # a shared 2-core CI box: 2 OpenMP threads per process thrash
        },
    )
    run_dir = tmp_path / "run"
    result = run_finetune(cfg, run_dir)

    print(f"QLoRA in Ray Train: {result.step_seconds} s/step ({result.compute_dtype} compute)")
    assert result.steps == 2 and len(result.losses) == 2
    assert result.compute_dtype in ("float32", "bfloat16")
    assert all(math.isfinite(x) for x in result.losses)
    assert result.eval_loss_before is not None and math.isfinite(result.eval_loss_before)
    assert result.eval_loss_after is not None and math.isfinite(result.eval_loss_after)
    assert result.eval_loss_after != result.eval_loss_before  # the adapter changed the model
    assert result.tokens > 0 and result.train_flops > 0 and result.eval_flops > 0

    # FLOPs: real tokens bounded by the padded upper bound (2 steps x 2 rows x 48).
    from frugalray.budget.flops import train_step_flops
    from frugalray.models import model_shape

    shape = model_shape(default_model_path)
    bound = 2 * train_step_flops(shape, 2, 48, "qlora", shape.lora_params(4))
    assert 0 < result.train_flops <= bound
    assert result.trainable_params == shape.lora_params(4)

    entries = [e for e in ComputeLedger(run_dir).entries() if e["stage"] == "finetune"]
    assert len(entries) == 1
    assert entries[0]["flops"] == pytest.approx(result.flops)
    assert entries[0]["produced"]["adapter_path"] == result.adapter_path

    # The exported adapter loads onto the base model with PEFT and changes its output.
    import torch
    from peft import PeftModel

    from frugalray.models import load_causal_lm, load_tokenizer

    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    tokenizer = load_tokenizer(default_model_path)
    base = load_causal_lm(default_model_path)
    ids = tokenizer("What is 3 + 4?", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits
    tuned = PeftModel.from_pretrained(base, result.adapter_path)
    with torch.no_grad():
        tuned_logits = tuned(**ids).logits
    assert not torch.allclose(base_logits, tuned_logits)

    # vLLM's own adapter loader (what the served engine runs for a LoRARequest) accepts it:
    # config validated against the engine's LoRA limits, every tensor mapped to a Llama module.
    assert_vllm_loads_adapter(result.adapter_path, max_lora_rank=8)


def assert_vllm_loads_adapter(adapter_path: str, max_lora_rank: int) -> None:
    """Run vLLM's adapter loading path (PEFTHelper + LoRAModel.from_local_checkpoint) on CPU.

    The session's served engine (`served_model`) takes its adapters at deploy time, so a
    freshly trained adapter cannot be added to it without a second deployment; this runs the
    exact code its worker runs to load one, without a second engine.
    """
    import torch
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models.llama import LlamaForCausalLM

    helper = PEFTHelper.from_local_dir(adapter_path, max_position_embeddings=8192)
    helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))
    expected: set[str] = set()
    for module in ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]:  # vLLM's Llama linear layers
        expected.update(LlamaForCausalLM.packed_modules_mapping.get(module, [module]))
    lora = LoRAModel.from_local_checkpoint(adapter_path, expected, helper, lora_model_id=1, device="cpu",
                                           dtype=torch.float32)
    assert len(lora.loras) == 30 * 7  # every adapted linear of every layer of the default model


def test_cuda_on_a_cluster_that_can_never_provide_a_gpu_is_refused_before_launch(
    ray_cluster, default_model_path, tmp_path, monkeypatch
):
    """The session's cluster: CPU nodes only and no autoscaler. `device: cuda` passes the driver's
    preflight (a CPU head may submit GPU work) and is refused once the cluster is known, naming the field."""
    from frugalray.config import ConfigError
    from frugalray.train.finetune import preflight_finetune

    monkeypatch.delenv("FRUGALRAY_AUTOSCALER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml from a ray-up head
    cfg = parse_config(FinetuneConfig, {"model": default_model_path, "data_path": write_sum_rows(tmp_path / "t.jsonl", 8),
                                        "method": "lora", "max_steps": 1, "eval_rows": 0, "device": "cuda"})
    preflight_finetune(cfg)  # no "this machine has no CUDA device": the GPU would be elsewhere
    with pytest.raises(ConfigError) as err:
        run_finetune(cfg, tmp_path / "run")
    (problem,) = err.value.problems
    assert problem.startswith("device: 'cuda' but neither the Ray cluster nor its autoscaler can provide a GPU"), problem
    assert "autoscaler node types (no autoscaler seen)" in problem
    assert not (tmp_path / "run").exists()  # nothing launched, nothing written
