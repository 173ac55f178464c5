"""What the curation and Tune stages ask Ray for, decided from `device` and the cluster (no Ray here).

Scoring actors, pass-rate engines, the dynamics proxy task, the auto-select proxy and Tune trials:
CPU requests exactly as before this issue; on GPU `num_gpus` (fractional for scorers) and
`accelerator_type`; `num_gpus` or `device: cuda` where no GPU can ever come refused, naming the
field; the scoring dtype follows the device unless one is named.
"""

from __future__ import annotations

import pytest

from frugalray import devices
from frugalray.config import ConfigError, parse_config
from frugalray.data.auto_select import AutoSettings, auto_proxy_target
from frugalray.data.difficulty import PassRateScorer, PassRateSettings, engine_args
from frugalray.data.score import (
    ScoreConfig,
    pass_rate_placement,
    place_scorers,
    proxy_placement,
    scorer_placement,
    scorer_resources,
    scoring_dtype,
)
from frugalray.data.score_shards import score_fingerprint
from frugalray.devices import ClusterDevices, DeviceUnavailable, LocalDevices, NodeType
from frugalray.tune.sweep import SweepConfig, sweep_placement, trial_resources

CPU_ONLY = ClusterDevices(running=(NodeType("head", {"CPU": 8.0}, max_nodes=1, running=1),))
# The shipped cluster.yaml's shape: a CPU head, GPU workers the autoscaler adds on demand.
AUTOSCALED_GPUS = ClusterDevices(
    running=CPU_ONLY.running,
    autoscaler=(NodeType("gpu_worker", {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, max_nodes=2),),
    autoscaler_source="test",
)
NO_BF16_CPU = LocalDevices(cpu_bf16=False)
BF16_CPU = LocalDevices(cpu_bf16=True)


def _score(**kw) -> ScoreConfig:
    return parse_config(ScoreConfig, {"input_path": "in.jsonl", "output_path": "out", **kw})


def _sweep(**finetune) -> SweepConfig:
    return parse_config(SweepConfig, {"finetune": {"data_path": "d.jsonl", **finetune}, "flop_cap": 1e15})


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(devices, "local_devices", lambda: NO_BF16_CPU)


# -- CPU: exactly what each stage asked for before ----------------------------------------------------

@pytest.mark.parametrize("cluster", [CPU_ONLY, AUTOSCALED_GPUS])
def test_cpu_requests_are_what_they_always_were(cluster, cpu_without_bf16):
    cfg = _score(device="cpu", num_cpus_per_actor=2, num_actors=2, scorers=["perplexity", "dynamics", "pass_rate"],
                 pass_rate={"device": "cpu"}, dynamics={"proxy": {"device": "cpu"}})
    # before: map_batches(..., num_cpus=cfg.num_cpus_per_actor) for both pools, ray.remote(num_cpus=...) for the proxy
    assert scorer_resources(scorer_placement(cfg, cluster)) == {"num_cpus": 2}
    assert scorer_resources(pass_rate_placement(cfg, cluster)) == {"num_cpus": 2}
    assert scorer_resources(proxy_placement(cfg, cluster)) == {"num_cpus": 2}
    # before: tune.with_resources(..., {"cpu": 1})
    assert trial_resources(sweep_placement(_sweep(device="cpu"), cluster)) == {"cpu": 1}


def test_auto_on_a_cluster_without_gpus_is_the_cpu_path(cpu_without_bf16):
    cfg = _score(scorers=["perplexity", "pass_rate", "dynamics"])  # every device left at auto
    placed = place_scorers(cfg, cluster=CPU_ONLY)
    assert [p.device for p in (placed.scorers, placed.pass_rate, placed.proxy)] == ["cpu"] * 3
    assert scorer_resources(placed.scorers) == {"num_cpus": 1.0}
    assert placed.cfg.dtype == "float32"  # what ScoreConfig.dtype defaulted to before
    assert trial_resources(sweep_placement(_sweep(), CPU_ONLY)) == {"cpu": 1}
    assert auto_proxy_target(AutoSettings().proxy, CPU_ONLY) == ("cpu", None)


def test_actors_without_a_model_stay_on_cpu_under_auto():
    cfg = _score(scorers=["heuristics", "verifier"], fields={"answer": "answer"})
    assert scorer_placement(cfg, AUTOSCALED_GPUS).device == "cpu"  # a GPU would sit idle
    assert scorer_placement(cfg.model_copy(update={"device": "cuda"}), AUTOSCALED_GPUS).device == "cuda"


# -- GPU ----------------------------------------------------------------------------------------------

def test_fractional_gpus_pack_scorers_onto_the_autoscaled_gpu_nodes():
    cfg = _score(device="cuda", num_gpus=0.25, num_actors=8)  # 8 actors, 4 per GPU, 2 GPU nodes
    placement = scorer_placement(cfg, AUTOSCALED_GPUS)
    assert scorer_resources(placement) == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert placement.needs_autoscaler and placement.node_type == "gpu_worker"
    assert placement.describe("bfloat16") == "score: 8 workers on GPU (autoscaler: gpu_worker), bfloat16"
    with pytest.raises(ConfigError, match=r"- num_actors: 9 score workers"):
        scorer_placement(cfg.model_copy(update={"num_actors": 9}), AUTOSCALED_GPUS)


def test_auto_asks_every_stage_for_the_gpus_the_autoscaler_can_add():
    cfg = _score(scorers=["perplexity", "pass_rate", "dynamics"])
    assert scorer_resources(scorer_placement(cfg, AUTOSCALED_GPUS)) == {"num_cpus": 1.0, "num_gpus": 1.0}
    # one vLLM engine and one proxy fine-tune per whole GPU
    assert scorer_resources(pass_rate_placement(cfg, AUTOSCALED_GPUS)) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert scorer_resources(proxy_placement(cfg, AUTOSCALED_GPUS)) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert trial_resources(sweep_placement(_sweep(), AUTOSCALED_GPUS)) == {"cpu": 1.0, "gpu": 1.0}
    device, placement = auto_proxy_target(AutoSettings().proxy, AUTOSCALED_GPUS)
    assert device == "cuda" and placement.remote_options() == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_accelerator_becomes_accelerator_type():
    cfg = _score(accelerator="A10G", num_gpus=0.5, scorers=["perplexity", "pass_rate"],
                 pass_rate={"accelerator": "A10G"})
    assert scorer_resources(scorer_placement(cfg, AUTOSCALED_GPUS)) == {
        "num_cpus": 1.0, "num_gpus": 0.5, "accelerator_type": "A10G"}
    assert scorer_resources(pass_rate_placement(cfg, AUTOSCALED_GPUS))["accelerator_type"] == "A10G"
    assert trial_resources(sweep_placement(_sweep(accelerator="A10G"), AUTOSCALED_GPUS)) == {
        "cpu": 1.0, "gpu": 1.0, "accelerator_type:A10G": 0.001}
    # no node type has an L4: refused before launch, never a silent CPU under device auto
    for stage in (lambda: scorer_placement(cfg.model_copy(update={"accelerator": "L4"}), AUTOSCALED_GPUS),
                  lambda: pass_rate_placement(cfg.model_copy(update={"pass_rate": PassRateSettings(accelerator="L4")}),
                                              AUTOSCALED_GPUS),
                  lambda: sweep_placement(_sweep(accelerator="L4"), AUTOSCALED_GPUS),
                  lambda: auto_proxy_target(AutoSettings(proxy={"accelerator": "L4"}).proxy, AUTOSCALED_GPUS)):
        with pytest.raises(ConfigError, match=r"accelerator: 'L4' but .* GPU of type L4"):
            stage()


# -- bad input: refused before launch, naming the field ---------------------------------------------

def test_num_gpus_with_device_cpu_is_refused_naming_num_gpus():
    with pytest.raises(ConfigError, match=r"num_gpus: 0.5 GPU per actor but device is 'cpu'; drop num_gpus"):
        _score(device="cpu", num_gpus=0.5)
    with pytest.raises(ConfigError, match=r"accelerator: 'A10G' names a GPU but device is 'cpu'"):
        _score(device="cpu", accelerator="A10G")
    with pytest.raises(ConfigError, match=r"num_gpus: 1.5; Ray takes a fraction below 1 or a whole number"):
        _score(num_gpus=1.5)
    for bad in (0, 9):
        with pytest.raises(ConfigError, match=r"- num_gpus: "):
            _score(num_gpus=bad)


def test_num_gpus_without_gpus_anywhere_is_refused_naming_num_gpus():
    with pytest.raises(ConfigError) as err:
        scorer_placement(_score(num_gpus=0.25), CPU_ONLY)
    assert str(err.value).splitlines()[-1].lstrip(" -").startswith("num_gpus: 0.25 GPU per scoring actor, but neither")
    assert "drop num_gpus to score on CPU" in str(err.value)


@pytest.mark.parametrize("stage, field", [
    (lambda: scorer_placement(_score(device="cuda"), CPU_ONLY), "device"),
    (lambda: pass_rate_placement(_score(scorers=["pass_rate"], pass_rate={"device": "cuda"}), CPU_ONLY),
     "pass_rate.device"),
    (lambda: proxy_placement(_score(scorers=["dynamics"], dynamics={"proxy": {"device": "cuda"}}), CPU_ONLY),
     "dynamics.proxy.device"),
    (lambda: sweep_placement(_sweep(device="cuda"), CPU_ONLY), "finetune.device"),
    (lambda: auto_proxy_target(AutoSettings(proxy={"device": "cuda"}).proxy, CPU_ONLY), "auto.proxy.device"),
])
def test_cuda_without_gpus_anywhere_is_refused_naming_the_stage_field(stage, field):
    with pytest.raises(ConfigError) as err:
        stage()
    line = str(err.value).splitlines()[-1].lstrip(" -")
    assert line.startswith(f"{field}: 'cuda' but neither the Ray cluster nor its autoscaler can provide a GPU"), line


def test_more_concurrent_gpu_trials_than_the_cluster_can_hold_is_refused():
    cfg = _sweep(device="cuda").model_copy(update={"max_concurrent_trials": 3})  # 2 GPU nodes at most
    with pytest.raises(ConfigError, match=r"max_concurrent_trials: 3 sweep workers"):
        sweep_placement(cfg, AUTOSCALED_GPUS)


def test_an_accelerator_with_a_cpu_device_is_refused_naming_the_section():
    with pytest.raises(ConfigError, match=r"- pass_rate: .*accelerator: 'L4' names a GPU but device is 'cpu'"):
        _score(pass_rate={"device": "cpu", "accelerator": "L4"})
    with pytest.raises(ConfigError, match=r"dynamics.proxy.accelerator: 'L4'"):
        proxy_placement(_score(scorers=["dynamics"], dynamics={"proxy": {"device": "cpu", "accelerator": "L4"}}),
                        CPU_ONLY)
    with pytest.raises(ConfigError, match=r"finetune.accelerator: 'L4'"):
        sweep_placement(_sweep(device="cpu", accelerator="L4"), CPU_ONLY)


# -- the scoring dtype follows the device -------------------------------------------------------------

def test_dtype_auto_follows_the_device(monkeypatch):
    cfg = _score()
    assert cfg.dtype == "auto"
    cpu, gpu = scorer_placement(cfg, CPU_ONLY), scorer_placement(cfg, AUTOSCALED_GPUS)
    monkeypatch.setattr(devices, "local_devices", lambda: NO_BF16_CPU)
    assert scoring_dtype(cfg, cpu) == "float32"  # AVX2 only: bf16 matmuls are emulated
    assert scoring_dtype(cfg, gpu) == "bfloat16"
    t4 = scorer_placement(cfg.model_copy(update={"accelerator": "T4"}),
                          ClusterDevices(autoscaler=(NodeType("t4", {"CPU": 4, "GPU": 1, "accelerator_type:T4": 1},
                                                              max_nodes=1),)))
    assert scoring_dtype(cfg, t4) == "float32"  # pre-Ampere: no bf16 tensor cores
    monkeypatch.setattr(devices, "local_devices", lambda: BF16_CPU)
    assert scoring_dtype(cfg, cpu) == "bfloat16"  # AVX512-BF16 / AMX


def test_an_explicit_dtype_is_never_swapped(cpu_without_bf16):
    assert scoring_dtype(_score(dtype="bfloat16"), scorer_placement(_score(), CPU_ONLY)) == "bfloat16"
    assert scoring_dtype(_score(dtype="float32"), scorer_placement(_score(), AUTOSCALED_GPUS)) == "float32"
    assert place_scorers(_score(dtype="bfloat16"), cluster=CPU_ONLY).cfg.dtype == "bfloat16"


def test_the_resume_fingerprint_holds_the_resolved_dtype_not_where_actors_run(cpu_without_bf16):
    rows = [{"source_index": 0, "id": "a", "prompt": "p", "response": "r"}]
    cfg = place_scorers(_score(), cluster=CPU_ONLY).cfg
    base = score_fingerprint(cfg, "/m", rows)
    assert base == score_fingerprint(_score(dtype="float32"), "/m", rows)  # an output scored before this issue resumes
    moved = cfg.model_copy(update={"device": "cuda", "num_gpus": 0.5, "accelerator": "A10G", "capacity_timeout_s": 5.0,
                                   "pass_rate": PassRateSettings(device="cuda", accelerator="A10G")})
    assert score_fingerprint(moved, "/m", rows) == base
    assert score_fingerprint(cfg.model_copy(update={"dtype": "bfloat16"}), "/m", rows) != base


# -- pass-rate engines ----------------------------------------------------------------------------------

def test_pass_rate_engine_arguments_per_device(cpu_without_bf16):
    settings = PassRateSettings(kv_cache_gib=2)
    kwargs, env = engine_args(settings, "cpu")
    assert kwargs == {"max_model_len": 1024, "seed": 0, "enforce_eager": True, "dtype": "float32"}
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    kwargs, env = engine_args(settings, "cuda")
    assert kwargs == {"max_model_len": 1024, "seed": 0, "dtype": "auto"} and env == {}
    chosen = PassRateSettings(engine_kwargs={"dtype": "float16", "gpu_memory_utilization": 0.5})
    assert engine_args(chosen, "cuda")[0]["dtype"] == "float16"
    assert engine_args(chosen, "cpu")[0]["gpu_memory_utilization"] == 0.5


# -- work placed on a GPU checks CUDA is there (this machine has none) --------------------------------

def test_gpu_placed_work_refuses_a_node_without_cuda(tmp_path):
    from frugalray.data.dynamics import proxy_finetune
    from frugalray.data.scoring_actor import RowScorer
    from frugalray.tune.sweep import sweep_trial

    if devices.probe_local_devices(with_four_bit=False).cuda:
        pytest.skip("this machine has CUDA")
    placed_for = {"CPU": 1.0, "GPU": 0.25}
    with pytest.raises(DeviceUnavailable, match=r"CUDA not available on node .*: score .*placed there for a GPU "
                                                r"\(\{'CPU': 1.0, 'GPU': 0.25\}\)"):
        RowScorer("/no/model", 64, device="cuda", placed_for=placed_for)
    with pytest.raises(DeviceUnavailable, match=r"CUDA not available on node .*: pass-rate engine"):
        PassRateScorer("/no/model", {}, device="cuda", placed_for={"CPU": 1.0, "GPU": 1.0})
    with pytest.raises(DeviceUnavailable, match=r"CUDA not available on node .*: dynamics proxy"):
        proxy_finetune("/no/model", [], {}, 64, str(tmp_path), device="cuda")
    with pytest.raises(DeviceUnavailable, match=r"CUDA not available on node .*: sweep trial"):
        sweep_trial({}, {}, "/no/model", [], [], "no-budget", 1, 1, 1, device="cuda", placed_for={"GPU": 1.0})
