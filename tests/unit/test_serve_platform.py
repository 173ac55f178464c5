"""The Serve engine on CPU or GPU: what it asks Ray and vLLM for, its platform check, and which
vLLM-CPU workarounds the ingress applies per engine platform (no Ray cluster, no engine)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_engine import FakeResponse, FakeStream

from frugalray.budget.flops import ModelShape
from frugalray.config import ConfigError, parse_config
from frugalray.devices import ClusterDevices, DeviceUnavailable, NodeType, Placement
from frugalray.serve.config import ResolvedServe, ServeConfig
from frugalray.serve.gate import (
    CPU_WORKAROUNDS,
    GPU_WORKAROUNDS,
    isolated_request_problem,
    wants_prompt_logprobs,
    workarounds_for,
)
from frugalray.serve.validation import RequestError, parse_request

SHAPE = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=1000)
RESOLVED = ResolvedServe(model_path="/models/m", shape=SHAPE)
CPU = Placement("serve", "cpu", 1, {"CPU": 2.0})
CUDA = Placement("serve", "cuda", 1, {"CPU": 1.0, "GPU": 1.0})
CUDA_A10G_TP2 = Placement("serve", "cuda", 1, {"CPU": 1.0, "GPU": 2.0}, accelerator="A10G")


# -- what the engine asks for --------------------------------------------------------------------

def test_cpu_engine_asks_for_its_cpus_runs_eager_and_gets_the_vllm_cpu_environment(monkeypatch):
    from frugalray import models
    from frugalray.serve.app import engine_plan, llm_config_for

    monkeypatch.setattr(models, "has_fast_bf16", lambda: False)
    cfg = ServeConfig(model="/models/m", engine_cpus=2, kv_cache_gib=3, engine_reserved_cpus=0)
    plan = engine_plan(cfg, RESOLVED, CPU)
    assert plan.platform == "cpu"
    assert plan.bundles == [{"CPU": 2.0}]
    assert plan.engine_kwargs["enforce_eager"] is True
    assert plan.engine_kwargs["dtype"] == "float32"
    # small KV blocks, so short prompts' later rounds are served from vLLM's prefix cache
    assert plan.engine_kwargs["block_size"] == 32
    assert "tensor_parallel_size" not in plan.engine_kwargs
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "3" and plan.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    llm = llm_config_for(cfg, RESOLVED, CPU)
    assert llm.placement_group_config["bundles"] == [{"CPU": 2.0}]
    assert llm.accelerator_type is None
    # no placement (e.g. bench/serve_overhead.py): the CPU engine of before, from the config alone
    assert llm_config_for(cfg, RESOLVED).placement_group_config["bundles"] == [{"CPU": 2.0}]


def test_gpu_engine_asks_for_a_gpu_with_cuda_graphs_and_no_vllm_cpu_variables(monkeypatch):
    from frugalray import models
    from frugalray.serve.app import engine_plan, llm_config_for

    monkeypatch.setattr(models, "has_fast_bf16", lambda: False)  # the driver's CPU says nothing about a GPU
    cfg = ServeConfig(model="/models/m", engine_reserved_cpus=0)
    plan = engine_plan(cfg, RESOLVED, CUDA)
    assert plan.platform == "cuda"
    assert plan.bundles == [{"GPU": 1.0, "CPU": 1.0}]
    assert "enforce_eager" not in plan.engine_kwargs and "block_size" not in plan.engine_kwargs
    assert plan.engine_kwargs["dtype"] == "auto"
    assert plan.engine_kwargs["tensor_parallel_size"] == 1
    assert not [k for k in plan.env if k.startswith("VLLM_CPU")]
    llm = llm_config_for(cfg, RESOLVED, CUDA)
    assert llm.placement_group_config["bundles"] == [{"GPU": 1.0, "CPU": 1.0}]
    assert not [k for k in llm.runtime_env["env_vars"] if k.startswith("VLLM_CPU")]


def test_gpu_engine_with_an_accelerator_and_tensor_parallelism():
    from frugalray.serve.app import llm_config_for

    cfg = ServeConfig(model="/models/m", accelerator="A10G", tensor_parallel_size=2)
    llm = llm_config_for(cfg, RESOLVED, CUDA_A10G_TP2)
    assert llm.placement_group_config["bundles"] == [{"GPU": 1.0, "CPU": 1.0}] * 2
    assert llm.accelerator_type == "A10G"
    assert llm.engine_kwargs["tensor_parallel_size"] == 2
    # what Ray Serve LLM reserves: one GPU per rank, each on an A10G node
    assert llm.get_engine_config().placement_bundles == [
        {"GPU": 1.0, "CPU": 1.0, "accelerator_type:A10G": 0.001}] * 2


def test_an_accelerator_ray_serve_llm_does_not_name_is_asked_for_in_the_bundles():
    from frugalray.serve.app import llm_config_for

    cfg = ServeConfig(model="/models/m", accelerator="my-gpu")
    llm = llm_config_for(cfg, RESOLVED, Placement("serve", "cuda", 1, {"CPU": 1.0, "GPU": 1.0}, accelerator="my-gpu"))
    assert llm.accelerator_type is None
    assert llm.placement_group_config["bundles"] == [{"GPU": 1.0, "CPU": 1.0, "accelerator_type:my-gpu": 0.001}]


@pytest.mark.parametrize("placement", [CPU, CUDA], ids=["cpu", "cuda"])
def test_the_operators_engine_kwargs_win(placement):
    from frugalray.serve.app import engine_plan

    cfg = ServeConfig(model="/models/m", engine_kwargs={"dtype": "bfloat16", "enforce_eager": False,
                                                       "max_model_len": 1024, "block_size": 128})
    kwargs = engine_plan(cfg, RESOLVED, placement).engine_kwargs
    assert (kwargs["dtype"], kwargs["enforce_eager"], kwargs["max_model_len"]) == ("bfloat16", False, 1024)
    assert kwargs["block_size"] == 128


def test_the_engine_log_line_names_device_node_type_and_dtype():
    from frugalray.serve.app import describe_engine

    placement = Placement("serve", "cuda", 1, {"CPU": 1.0, "GPU": 2.0}, accelerator="A10G", node_type="gpu_worker",
                          needs_autoscaler=True)
    cfg = ServeConfig(model="/models/m", accelerator="A10G", tensor_parallel_size=2)
    assert describe_engine(cfg, RESOLVED, placement) == (
        "serve: 1 worker on GPU A10G (autoscaler: gpu_worker), auto, tensor_parallel_size 2")


# -- where the engine goes -----------------------------------------------------------------------

HEAD = NodeType("head", {"CPU": 8.0}, max_nodes=1, running=1)
CPU_ONLY = ClusterDevices(running=(HEAD,))
GPU_LATER = ClusterDevices(running=(HEAD,), autoscaler=(
    NodeType("gpu_worker", {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, max_nodes=2),),
    autoscaler_source="test")


def test_auto_takes_a_gpu_node_type_the_autoscaler_may_still_launch():
    from frugalray.serve.app import serve_placement

    placement = serve_placement(ServeConfig(model="/models/m"), GPU_LATER)
    assert (placement.device, placement.node_type, placement.needs_autoscaler) == ("cuda", "gpu_worker", True)
    assert serve_placement(ServeConfig(model="/models/m", accelerator="A10G"), GPU_LATER).accelerator == "A10G"
    assert serve_placement(ServeConfig(model="/models/m"), CPU_ONLY).device == "cpu"
    assert serve_placement(ServeConfig(model="/models/m", device="cpu"), GPU_LATER).device == "cpu"


@pytest.mark.parametrize(("data", "cluster", "field"), [
    ({"device": "cuda"}, CPU_ONLY, "device"),
    ({"accelerator": "A10G"}, CPU_ONLY, "accelerator"),  # auto must not fall back to the CPU silently
    ({"accelerator": "H100"}, GPU_LATER, "accelerator"),
    ({"tensor_parallel_size": 2}, GPU_LATER, "tensor_parallel_size"),  # 2 GPUs on one node: no such node
])
def test_a_gpu_engine_the_cluster_can_never_hold_is_refused_naming_the_field(data, cluster, field):
    from frugalray.serve.app import serve_placement

    with pytest.raises(ConfigError) as err:
        serve_placement(ServeConfig(model="/models/m", **data), cluster)
    assert err.value.problems[0].startswith(f"{field}:"), err.value.problems


def test_without_a_cluster_auto_is_the_cpu_engine_and_cuda_is_taken_at_its_word():
    from frugalray.serve.app import serve_placement

    assert serve_placement(ServeConfig(model="/models/m", engine_cpus=3)).per_worker == {"CPU": 3.0}
    assert serve_placement(ServeConfig(model="/models/m", device="cuda", tensor_parallel_size=2)).device == "cuda"


@pytest.mark.parametrize(("data", "needle"), [
    ({"device": "gpu"}, "device"),
    ({"device": "cpu", "accelerator": "A10G"}, "accelerator"),
    ({"device": "cpu", "tensor_parallel_size": 2}, "tensor_parallel_size"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"engine_kwargs": {"tensor_parallel_size": 2}}, "engine_kwargs.tensor_parallel_size"),
])
def test_device_settings_are_checked_naming_the_field(data, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(ServeConfig, {"model": "/models/m", **data})
    cfg = ServeConfig(model="/models/m")
    assert (cfg.device, cfg.accelerator, cfg.tensor_parallel_size) == ("auto", None, 1)


def test_build_app_uses_the_checking_engine_and_tells_the_ingress_the_platform(monkeypatch):
    import ray.serve.llm

    from frugalray.serve.app import build_app
    from frugalray.serve.engine import FrugalLLMServer

    built = {}
    monkeypatch.setattr(ray.serve.llm, "build_llm_deployment",
                        lambda llm_config, **kw: built.update(kw, llm_config=llm_config) or "engine")
    for placement in (CPU, CUDA):
        app = build_app(ServeConfig(model="/models/m"), RESOLVED, placement)
        assert built["deployment_cls"] is FrugalLLMServer
        assert app._bound_deployment.init_args[1]["engine_platform"] == placement.device


@pytest.mark.parametrize(("placement", "waits"), [
    (CPU, False),  # CPU on the running nodes goes straight to Serve, as before
    (Placement("serve", "cpu", 1, {"CPU": 2.0}, node_type="cpu_worker", needs_autoscaler=True), True),
    (CUDA, True),
])
def test_deploy_waits_for_the_engines_node_when_the_autoscaler_must_add_it(monkeypatch, placement, waits):
    from ray import serve

    from frugalray.serve import app

    waited = []
    monkeypatch.setattr(app, "preflight", lambda cfg: RESOLVED)
    monkeypatch.setattr(app, "init_ray", lambda: None)
    monkeypatch.setattr(app, "resolve_serve_placement", lambda cfg: placement)
    monkeypatch.setattr(app, "wait_for_placement", lambda p, **kw: waited.append((p, kw)))
    monkeypatch.setattr(app, "build_app", lambda cfg, resolved, p: ("app", p))
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    ran = []
    monkeypatch.setattr(serve, "run", lambda target, **kw: ran.append(target))
    app.deploy(ServeConfig(model="/models/m", capacity_timeout_s=5))
    assert ran == [("app", placement)]
    assert waited == ([(placement, {"timeout_s": 5.0, "probe": False})] if waits else [])


# -- the engine's platform check -----------------------------------------------------------------

GPU_BUNDLES = {"bundles": [{"GPU": 1.0, "CPU": 1.0}]}


def test_vllm_cpu_on_a_gpu_bundle_is_refused_naming_the_node():
    from frugalray.serve.engine import check_engine_platform, placed_for_gpu

    assert placed_for_gpu(GPU_BUNDLES) and placed_for_gpu({"bundle_per_worker": {"GPU": 0.5}})
    assert not placed_for_gpu({"bundles": [{"CPU": 1.0}]}) and not placed_for_gpu(None)
    with pytest.raises(DeviceUnavailable, match=r"CUDA not available on node n1 \(host\): vLLM platform cpu on a "
                                                r"node placed for GPU .*device: cpu"):
        check_engine_platform(GPU_BUNDLES, "cpu", "n1 (host)")
    check_engine_platform(GPU_BUNDLES, "cuda")
    check_engine_platform(GPU_BUNDLES, "rocm")  # Ray's GPU resource covers AMD GPUs too
    check_engine_platform({"bundles": [{"CPU": 1.0}]}, "cpu")


def _server(cfg: ServeConfig, placement: Placement):
    from frugalray.serve.app import llm_config_for
    from frugalray.serve.engine import FrugalLLMServer

    return FrugalLLMServer.sync_init(llm_config_for(cfg, RESOLVED, placement))


def test_the_engine_refuses_to_start_on_vllm_cpu_when_placed_for_a_gpu(monkeypatch):
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    from frugalray.serve import engine

    started = []

    async def fake_start(self):
        started.append(self)

    monkeypatch.setattr(LLMServer, "start", fake_start)
    monkeypatch.setattr(engine, "vllm_platform", lambda: "cpu")
    with pytest.raises(DeviceUnavailable, match="vLLM platform cpu on a node placed for GPU"):
        asyncio.run(_server(ServeConfig(model="/models/m"), CUDA).start())
    assert started == []
    # a CUDA build of vLLM starts
    monkeypatch.setattr(engine, "vllm_platform", lambda: "cuda")
    asyncio.run(_server(ServeConfig(model="/models/m"), CUDA).start())
    assert len(started) == 1


def test_the_engine_on_cpu_bundles_starts_as_llm_server_does(monkeypatch):
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    from frugalray.serve import engine

    started = []

    async def fake_start(self):
        started.append(self)

    def no_platform_check():
        raise AssertionError("a CPU engine does not ask vLLM for its platform")

    monkeypatch.setattr(LLMServer, "start", fake_start)
    monkeypatch.setattr(engine, "vllm_platform", no_platform_check)
    asyncio.run(_server(ServeConfig(model="/models/m"), CPU).start())
    assert len(started) == 1
    # same constructors (Serve awaits `FrugalLLMServer(llm_config)`) and deployment options as LLMServer
    assert "__init__" not in engine.FrugalLLMServer.__dict__ and "sync_init" not in engine.FrugalLLMServer.__dict__
    assert engine.FrugalLLMServer.get_deployment_options.__func__ is LLMServer.get_deployment_options.__func__


# -- vLLM-CPU workarounds per engine platform ----------------------------------------------------

def test_every_workaround_applies_on_cpu_and_none_on_cuda():
    cpu, gpu = workarounds_for("cpu"), workarounds_for("cuda")
    assert (cpu.split_seeded_n, cpu.serialize_seeded, cpu.isolate_prompt_logprobs) == (True, True, True)
    assert cpu.cancel_release_delay_s == 1.0
    assert (gpu.split_seeded_n, gpu.serialize_seeded, gpu.isolate_prompt_logprobs) == (False, False, False)
    assert gpu.cancel_release_delay_s == 0.0
    # an unknown or missing platform gets the safe side
    assert workarounds_for(None) is CPU_WORKAROUNDS and workarounds_for("cuda") is GPU_WORKAROUNDS


def test_seeded_samples_are_split_only_on_cpu():
    assert CPU_WORKAROUNDS.seeded_requests(3, 7) == [(1, 7), (1, 8), (1, 9)]
    assert GPU_WORKAROUNDS.seeded_requests(3, 7) == [(3, 7)]  # vLLM seeds sample i with 7 + i itself
    assert CPU_WORKAROUNDS.seeded_requests(3, None) == [(3, None)]
    assert CPU_WORKAROUNDS.seeded_requests(1, 7) == [(1, 7)]


def test_prompt_logprobs_run_alone_only_on_cpu_with_adapters():
    assert wants_prompt_logprobs("completions", {"prompt_logprobs": 0})
    assert wants_prompt_logprobs("completions", {"echo": True, "logprobs": 0})
    assert not wants_prompt_logprobs("chat", {"echo": True, "logprobs": True})
    assert CPU_WORKAROUNDS.run_alone(True, has_adapters=True)
    assert not CPU_WORKAROUNDS.run_alone(True, has_adapters=False)
    assert not GPU_WORKAROUNDS.run_alone(True, has_adapters=True)
    body = {"prompt": "x", "prompt_logprobs": 0}
    assert isolated_request_problem("completions", body, n=1, stream=False, budgeted=False) is None
    param, message = isolated_request_problem("completions", body, n=2, stream=False, budgeted=False)
    assert param == "prompt_logprobs" and "n=1" in message
    assert isolated_request_problem("completions", {"prompt": ["a", "b"], "echo": True, "logprobs": 1},
                                    n=1, stream=False, budgeted=False)[0] == "echo"


# -- the ingress consults the flags (a fake engine handle, no Ray) -------------------------------

class _Engine:
    """Stands in for the LLMServer handle: records each request's (n, seed)."""

    def __init__(self):
        self.calls = []
        self.completions = self
        self.chat = self

    def options(self, **_):
        return self

    def remote(self, request, _raw=None):
        self.calls.append((request.get("n") or 1, request.get("seed")))
        return FakeStream(FakeResponse(request))


def _ingress(platform: str, adapters: dict[str, int] | None = None):
    from frugalray.serve.ingress import FrugalIngress

    plain = FrugalIngress.__mro__[1]  # the class under serve.ingress's ASGI wrapper
    ingress = object.__new__(plain)
    settings = {"model_name": "m", "adapters": adapters or {}, "shape": None, "model_path": None,
                "max_samples_ceiling": 16, "max_tokens_ceiling": 64, "default_samples": 1,
                "default_max_tokens": 8, "sample_temperature": 0.7, "engine_platform": platform}
    plain.__init__(ingress, _Engine(), settings)
    ingress._validated = lambda kind, payload: dict(payload)  # Ray's request types import vLLM
    ingress._raise_if_error = lambda item: None
    return ingress


def _dispatch(ingress, body):
    req = parse_request(body, 16, 64)
    response = asyncio.run(ingress._dispatch("completions", body, req, deadline=1e12))
    return json.loads(response.body)


@pytest.mark.parametrize(("platform", "calls"), [("cpu", [(1, 7), (1, 8), (1, 9)]), ("cuda", [(3, 7)])])
def test_seeded_n_is_split_into_engine_requests_only_on_cpu(platform, calls):
    ingress = _ingress(platform)
    result = _dispatch(ingress, {"model": "m", "prompt": "2+2=", "n": 3, "seed": 7})
    assert ingress._server.calls == calls
    assert len(result["choices"]) == 3


@pytest.mark.parametrize(("platform", "calls"), [("cpu", [(1, 5), (1, 6), (1, 7)]), ("cuda", [(3, 5)])])
def test_seeded_self_consistency_is_one_engine_request_on_cuda(platform, calls):
    ingress = _ingress(platform)
    body = {"model": "m", "prompt": "2+2=", "seed": 5,
            "compute_budget": {"strategy": "self_consistency", "max_samples": 3}}
    result = _dispatch(ingress, body)
    assert ingress._server.calls == calls
    assert result["usage"]["frugalray"]["answer"] == "42"


def test_a_seeded_n_stream_is_refused_on_cpu_and_streams_on_cuda():
    body = {"model": "m", "prompt": "2+2=", "n": 2, "seed": 1, "stream": True}
    with pytest.raises(RequestError, match="seed:"):
        _dispatch(_ingress("cpu"), body)
    gpu = _ingress("cuda")
    streamed = []

    async def fake_stream(kind, payload, deadline):
        streamed.append(payload)
        from starlette.responses import JSONResponse

        return JSONResponse({"streamed": True})

    gpu._stream = fake_stream
    assert _dispatch(gpu, body) == {"streamed": True} and streamed[0]["seed"] == 1


def test_prompt_logprobs_with_adapters_are_refused_with_n_on_cpu_and_served_on_cuda():
    body = {"model": "m", "prompt": "2+2=", "n": 2, "prompt_logprobs": 0}
    with pytest.raises(RequestError, match="prompt_logprobs: prompt logprobs are served for one prompt"):
        _dispatch(_ingress("cpu", {"tuned": 100}), body)
    gpu = _ingress("cuda", {"tuned": 100})
    assert len(_dispatch(gpu, body)["choices"]) == 2
    assert gpu._server.calls == [(2, None)]


def test_seeded_requests_are_serialised_only_on_cpu():
    async def seeded_call_while_locked(ingress):
        async with ingress._seeded_lock:
            await asyncio.wait_for(ingress._call("completions", {"model": "m", "prompt": "x", "seed": 3}), 0.5)

    asyncio.run(seeded_call_while_locked(_ingress("cuda")))
    with pytest.raises(TimeoutError):
        asyncio.run(seeded_call_while_locked(_ingress("cpu")))


def test_vllm_cpu_keeps_a_spare_lora_slot_so_base_tokens_never_read_an_adapter():
    # vLLM-CPU's LoRA ops index the stacked adapters with -1 for a base-model token: the last slot.
    from frugalray.serve.app import engine_plan
    from frugalray.serve.config import AdapterInfo

    adapters = {n: AdapterInfo(n, f"/adapters/{n}", 8, "all-linear") for n in ("arith", "chat")}
    resolved = ResolvedServe(model_path="/models/m", shape=SHAPE, adapters=adapters)
    cfg = ServeConfig(model="/models/m", adapters={n: a.path for n, a in adapters.items()})
    cpu = engine_plan(cfg, resolved, CPU).engine_kwargs
    assert cpu["enable_lora"] is True and cpu["max_loras"] == 3  # two adapters and one slot left empty
    assert [m["name"] for m in cpu["lora_modules"]] == ["arith", "chat"]
    assert engine_plan(cfg, resolved, CUDA).engine_kwargs["max_loras"] == 2  # CUDA kernels skip -1
    assert "max_loras" not in engine_plan(cfg, RESOLVED, CPU).engine_kwargs
