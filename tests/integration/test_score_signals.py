"""Learning-dynamics and influence scorers against independent direct torch computations.

The scorer class runs in this process (no Ray; `test_score_resume.py` covers the Ray job): a
2-step proxy fine-tune, then `RowScorer` on a few rows, each number recomputed here with full
float64 logits or HF's own loss and an explicit projection matrix.
"""

from __future__ import annotations

import math

import pytest
import torch

from frugalray.data.dynamics import proxy_finetune
from frugalray.examples.generate import GenerateConfig, generate_tasks
from frugalray.data.influence import InfluenceSettings, projection_matrix
from frugalray.data.scoring_actor import RowScorer

ROWS = [
    {"prompt": r["instruction"], "response": r["response"]}
    for r in generate_tasks(GenerateConfig(n_rows=6, noise_rate=0.34, noise_kinds=["garbled", "wrong_answer"], seed=4))
]


def _encode(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    prompt_ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    response_ids = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


@pytest.mark.slow  # about 30 s alone; minutes on a busy shared box (3 model loads, a 2-step fine-tune)
@pytest.mark.timeout(900)
def test_dynamics_columns_match_a_direct_loop_over_checkpoints(default_model_path, tmp_path):
    from peft import PeftModel

    from frugalray.models import load_causal_lm, load_tokenizer

    settings = {"checkpoints": [0, 2], "proxy": {"batch_size": 2, "learning_rate": 5e-3, "lora_rank": 2}}
    proxy = proxy_finetune(default_model_path, ROWS, settings, 64, str(tmp_path / "dyn"), threads=2)
    assert [p.rsplit("/", 1)[1] for p in proxy["checkpoints"]] == ["step-00000", "step-00002"]
    assert len(proxy["losses"]) == 2 and proxy["flops"] > 0

    scorer = RowScorer(default_model_path, 64, scorers=("dynamics",), torch_threads=2,
                       dynamics={"checkpoints": proxy["checkpoints"], "chunk_tokens": 3})
    rows = ROWS[:2]
    got = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])

    tok = load_tokenizer(default_model_path)
    per_ckpt = []  # [checkpoint][row] -> (nll list, el2n list, correct list)
    base = load_causal_lm(default_model_path).eval()
    for path in proxy["checkpoints"]:
        model = PeftModel.from_pretrained(base, path).eval()
        rows_stats = []
        for r in rows:
            ids, labels = _encode(tok, r["prompt"], r["response"])
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            stats = []
            for t in range(1, len(ids)):
                if labels[t] == -100:
                    continue
                p = probs[t - 1]
                onehot = torch.zeros_like(p)
                onehot[labels[t]] = 1
                stats.append((-math.log(p[labels[t]]), float((p - onehot).norm()), int(p.argmax()) == labels[t]))
            rows_stats.append(stats)
        per_ckpt.append(rows_stats)
        base = model.unload()  # strip the LoRA layers: the next checkpoint starts from the bare base model
    # Step 0's adapter has lora_B = 0: the reference model; step 2 moved.
    assert per_ckpt[0][0] != per_ckpt[1][0]
    n_ckpt = len(per_ckpt)
    for i in range(len(rows)):
        losses = [sum(s[0] for s in ck[i]) / len(ck[i]) for ck in per_ckpt]
        mean = sum(losses) / n_ckpt
        el2n = sum(sum(s[1] for s in ck[i]) / len(ck[i]) for ck in per_ckpt) / n_ckpt
        forgetting = sum(
            sum(1 for a, b in zip(per_ckpt[c][i], per_ckpt[c + 1][i]) if a[2] and not b[2]) for c in range(n_ckpt - 1)
        )
        assert got["dyn_loss_mean"][i] == pytest.approx(mean, rel=1e-3)
        assert got["dyn_loss_var"][i] == pytest.approx(sum((x - mean) ** 2 for x in losses) / n_ckpt, rel=1e-2, abs=1e-6)
        assert got["el2n"][i] == pytest.approx(el2n, rel=1e-3)
        assert got["forgetting_events"][i] == forgetting
        assert 0 <= got["dyn_acc_mean"][i] <= 1


@pytest.mark.slow  # about 20 s alone: 2 model loads, 5 backward passes
@pytest.mark.timeout(900)
def test_influence_matches_explicit_projection_of_hf_loss_gradients(default_model_path):
    from peft import LoraConfig, get_peft_model

    from frugalray.models import load_causal_lm, load_tokenizer

    settings = InfluenceSettings(target_path="unused", dim=1024, seed=3, lora_rank=1, target_modules=["v_proj"])
    targets, rows = ROWS[:2], ROWS[2:4]
    scorer = RowScorer(default_model_path, 64, scorers=("influence",), torch_threads=2, influence={
        "settings": settings.model_dump(), "targets": [[t["prompt"], t["response"]] for t in targets],
    })
    got = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])["influence"]

    tok = load_tokenizer(default_model_path)
    torch.manual_seed(settings.seed)
    model = get_peft_model(load_causal_lm(default_model_path), LoraConfig(
        r=1, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=["v_proj"], task_type="CAUSAL_LM"))
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]

    def grad(r):
        ids, labels = _encode(tok, r["prompt"], r["response"])
        model.zero_grad()
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in params]).double()

    raw_targets = torch.stack([grad(t) for t in targets])
    raw_rows = torch.stack([grad(r) for r in rows])
    matrix = projection_matrix(raw_rows.shape[1], settings.dim, settings.seed).double()
    t_proj = raw_targets @ matrix
    direction = (t_proj / t_proj.norm(dim=1, keepdim=True)).mean(0)
    expected = torch.nn.functional.cosine_similarity(raw_rows @ matrix, direction[None], dim=1)
    assert got == pytest.approx(expected.tolist(), abs=2e-3)
    # And the projection keeps the unprojected cosine to within JL error at 1024 dims.
    raw_direction = (raw_targets / raw_targets.norm(dim=1, keepdim=True)).mean(0)
    unprojected = torch.nn.functional.cosine_similarity(raw_rows, raw_direction[None], dim=1)
    assert max(abs(a - b) for a, b in zip(got, unprojected.tolist())) < 0.15


@pytest.mark.slow  # a proxy fine-tune task + one actor with two model copies: 1-4 min on a shared box
@pytest.mark.timeout(900)
def test_run_score_with_dynamics_and_influence_on_ray(ray_cluster, default_model_path, tmp_path):
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from frugalray.budget.ledger import ComputeLedger
    from frugalray.examples.generate import write_rows
    from frugalray.data.score import ScoreConfig, run_score

    rows = generate_tasks(GenerateConfig(n_rows=5, seed=8))
    data = write_rows(rows[:4], tmp_path / "tasks.jsonl")
    target = write_rows(rows[4:], tmp_path / "target.jsonl")
    cfg = ScoreConfig(
        model=default_model_path, input_path=str(data), output_path=str(tmp_path / "scored"), batch_size=4,
        max_length=64, scorers=["dynamics", "influence"],
        dynamics={"checkpoints": [0, 1], "proxy": {"batch_size": 2, "lora_rank": 1, "target_modules": ["v_proj"]}},
        influence={"target_path": str(target), "dim": 64, "lora_rank": 1, "target_modules": ["v_proj"]},
    )
    result = run_score(cfg, tmp_path / "run")
    scored = pq.read_table(result.output_path).to_pylist()
    assert len(scored) == 4 and result.rows_in == 4
    for r in scored:
        assert r["el2n"] > 0 and r["dyn_loss_mean"] > 0 and r["dyn_loss_var"] >= 0 and r["forgetting_events"] >= 0
        assert -1 <= r["influence"] <= 1
    sidecar = json.loads(Path(result.sidecar_path).read_text())
    proxy = sidecar["scorers"]["dynamics"]["proxy"]
    assert proxy["checkpoints"] == ["step-00000", "step-00001"] and proxy["flops"] > 0 and len(proxy["losses"]) == 1
    assert sidecar["scorers"]["influence"]["target_rows"] == 1
    assert sidecar["scorers"]["influence"]["settings"]["dim"] == 64
    assert sidecar["columns"]["el2n"] == "dynamics" and sidecar["columns"]["influence"] == "influence"
    assert sidecar["scorers"]["dynamics"]["flops"] > proxy["flops"]  # training + scoring at 2 checkpoints
    (entry,) = ComputeLedger(tmp_path / "run").entries()
    assert entry["flops"] == pytest.approx(result.flops) == pytest.approx(sum(result.flops_by_scorer.values()))
