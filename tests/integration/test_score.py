"""Ray Data perplexity scoring on a real cluster, checked against a direct torch computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from frugalray.budget.flops import forward_flops_per_token
from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError
from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows
from frugalray.examples.loaders import FieldMapping
from frugalray.data.score import ScoreConfig, run_score
from frugalray.data.select import SelectConfig, run_select
from frugalray.models import model_shape


def _direct_perplexity(model_path: str, prompt: str, response: str) -> tuple[float, int]:
    """Response-token perplexity from one unbatched fp32 forward pass and a full log-softmax."""
    import torch

    from frugalray.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype="float32").eval()
    prompt_text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    # Token at position t is predicted by the logits at t - 1.
    positions = range(len(prompt_ids), len(prompt_ids) + len(response_ids))
    nll = -sum(logprobs[t - 1, ids[0, t]].item() for t in positions)
    return math.exp(nll / len(response_ids)), len(prompt_ids) + len(response_ids)


@pytest.mark.slow  # about 40-110 s on a shared 2-core box: actor start, model load, 11 rows
@pytest.mark.timeout(300)
def test_run_score_counts_perplexity_and_ledger(ray_cluster, default_model_path, tmp_path):
    rows = generate_tasks(GenerateConfig(
        n_rows=12, families=["arithmetic", "compare"], noise_rate=0.25,
        noise_kinds=["empty_response", "garbled", "wrong_answer"], seed=5,
    ))
    data = write_rows(rows, tmp_path / "tasks.jsonl")
    cfg = ScoreConfig(model=default_model_path, input_path=str(data), output_path=str(tmp_path / "scored"),
                      batch_size=4, max_length=128, num_actors=1, dtype="float32")
    # A stale earlier output in the same directory is replaced, not appended to.
    write_rows(rows[:2], tmp_path / "scored" / "old.parquet")
    result = run_score(cfg, tmp_path / "run")
    assert not (tmp_path / "scored" / "old.parquet").exists()

    assert result.rows_in == 12
    assert result.rows_quarantined == 1  # the empty response
    assert result.rows_scored + result.rows_quarantined == result.rows_in
    quarantined = [json.loads(line) for line in Path(result.quarantine_path).read_text().splitlines()]
    assert [q["noise_kind"] for q in quarantined] == ["empty_response"]
    assert quarantined[0]["quarantine_reason"].startswith("empty response")

    scored = pq.read_table(result.output_path).to_pylist()
    assert len(scored) == result.rows_scored == 11
    assert {r["id"] for r in scored} == {r["id"] for r in rows if r["noise_kind"] != "empty_response"}
    for r in scored:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 0
        assert r["n_loss_tokens"] >= 2 and r["n_tokens"] > r["n_loss_tokens"]  # response + end-of-turn
        assert r["mean_nll"] == pytest.approx(math.log(r["perplexity"]))
        assert r["noise_kind"] in ("none", "garbled", "wrong_answer") and r["messages"][0]["role"] == "user"
    # A garbled response is less likely under the model than a correct answer.
    by_kind = {r["noise_kind"]: r["perplexity"] for r in scored}
    clean = sorted(r["perplexity"] for r in scored if r["noise_kind"] == "none")
    assert by_kind["garbled"] > clean[len(clean) // 2]

    row = next(r for r in scored if r["noise_kind"] == "none")
    expected, n_tokens = _direct_perplexity(default_model_path, row["prompt"], row["response"])
    assert row["n_tokens"] == n_tokens
    assert row["perplexity"] == pytest.approx(expected, rel=1e-3)

    shape = model_shape(default_model_path)
    expected_flops = sum(forward_flops_per_token(shape, context=r["n_tokens"]) * r["n_tokens"] for r in scored)
    assert result.flops == pytest.approx(expected_flops)
    (entry,) = ComputeLedger(tmp_path / "run").entries()
    assert entry["stage"] == "score" and entry["flops"] == pytest.approx(expected_flops)
    assert entry["tokens"] == sum(r["n_tokens"] for r in scored)

    # The selected subset of scored rows is readable by training's prompt/response mapping.
    selected = run_select(SelectConfig(input_path=result.output_path, output_path=str(tmp_path / "sel.jsonl"),
                                       keep_fraction=0.5), tmp_path / "run")
    assert selected.kept == 6 and selected.kept + selected.dropped == 11
    kept_ids = {json.loads(line)["id"] for line in Path(selected.output_path).read_text().splitlines()}
    garbled_id = next(r["id"] for r in scored if r["noise_kind"] == "garbled")
    assert garbled_id not in kept_ids


def test_missing_response_column_fails_before_ray_work(tmp_path, default_model_path):
    data = write_rows(generate_tasks(GenerateConfig(n_rows=3, seed=0)), tmp_path / "t.jsonl")
    cfg = ScoreConfig(model=default_model_path, input_path=str(data), output_path=str(tmp_path / "out"),
                      fields=FieldMapping(response="output"))
    with pytest.raises(ConfigError, match="fields.response: column 'output' not in the dataset"):
        run_score(cfg, tmp_path)
    assert not (tmp_path / "out").exists()


def _direct_losses(model_path: str, prompt: str, response: str, lora: dict) -> tuple[float, float, float]:
    """(conditional loss, response-alone loss, LoRA gradient norm), each from HF's own loss in a
    plain unbatched torch loop: the independent check of IFD and GraNd."""
    import torch
    from peft import LoraConfig, get_peft_model

    from frugalray.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype="float32").eval()
    prompt_ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    response_ids = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + response_ids])
    with torch.no_grad():
        conditional = model(input_ids=ids, labels=labels).loss.item()
        alone = model(input_ids=torch.tensor([response_ids]), labels=torch.tensor([response_ids])).loss.item()
    torch.manual_seed(lora["seed"])
    peft_model = get_peft_model(model, LoraConfig(r=lora["lora_rank"], lora_alpha=lora["lora_alpha"], lora_dropout=0.0,
                                                  target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    loss = peft_model(input_ids=ids, labels=labels).loss
    loss.backward()
    norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in peft_model.parameters() if p.grad is not None))
    return conditional, alone, norm


@pytest.mark.slow  # about 60-180 s on a shared 2-core box: dedup map, actor start, model load, 9 rows x 4 passes
@pytest.mark.timeout(400)
def test_all_scorers_match_direct_computations_and_select_accounts_for_every_row(
    ray_cluster, default_model_path, tmp_path
):
    rows = generate_tasks(GenerateConfig(n_rows=10, noise_rate=0.3, seed=2,
                                         noise_kinds=["garbled", "exact_duplicate", "empty_response"]))
    data = write_rows(rows, tmp_path / "tasks.jsonl")
    cfg = ScoreConfig(model=default_model_path, input_path=str(data), output_path=str(tmp_path / "scored"),
                      batch_size=4, max_length=128, scorers=["perplexity", "ifd", "grand", "heuristics", "duplicates"])
    result = run_score(cfg, tmp_path / "run")
    scored = {r["id"]: r for r in pq.read_table(result.output_path).to_pylist()}
    assert len(scored) == result.rows_scored == 9 and result.rows_quarantined == 1

    clean = next(r for r in scored.values() if r["noise_kind"] == "none")
    conditional, alone, norm = _direct_losses(default_model_path, clean["prompt"], clean["response"],
                                              cfg.grand.model_dump())
    assert clean["mean_nll"] == pytest.approx(conditional, rel=1e-3)
    assert clean["mean_nll_response_alone"] == pytest.approx(alone, rel=1e-3)
    assert clean["ifd"] == pytest.approx(conditional / alone, rel=1e-3)
    assert clean["grand"] == pytest.approx(norm, rel=1e-2)
    assert all(math.isfinite(r["grand"]) and r["grand"] > 0 for r in scored.values())

    garbled = next(r for r in scored.values() if r["noise_kind"] == "garbled")
    assert garbled["garbage_ratio"] > 0.3 and clean["garbage_ratio"] == 0.0 and clean["degenerate_reason"] == ""
    copy = next(r for r in scored.values() if r["noise_kind"] == "exact_duplicate")
    assert copy["dup_cluster"] == scored[copy["duplicate_of"]]["dup_cluster"]
    assert copy["dup_cluster_size"] >= 2 and {copy["dup_kind"], scored[copy["duplicate_of"]]["dup_kind"]} == {"none", "exact"}

    sidecar = json.loads(Path(result.sidecar_path).read_text())
    assert sidecar["rows_in"] == 10 and sidecar["columns"]["ifd"] == "ifd"
    assert sidecar["scorers"]["grand"]["settings"]["lora_rank"] == 8
    assert sidecar["scorers"]["ifd"]["flops"] > 0 and sidecar["scorers"]["heuristics"]["flops"] == 0
    assert sidecar["scorers"]["grand"]["flops"] > 2 * sidecar["scorers"]["perplexity"]["flops"]
    assert result.flops == pytest.approx(sum(result.flops_by_scorer.values()))
    (entry,) = ComputeLedger(tmp_path / "run").entries()
    assert entry["flops"] == pytest.approx(result.flops) and set(entry["scorers"]) == set(cfg.scorers)

    selected = run_select(SelectConfig(input_path=result.output_path, output_path=str(tmp_path / "sel.jsonl"),
                                       strategy="weighted", weights={"perplexity": 1.0, "garbage_ratio": 1.0},
                                       dedup=True, keep_fraction=0.6), tmp_path / "run")
    assert selected.source_rows_in == 10 == selected.kept + selected.dropped + selected.quarantined
    assert selected.drop_reasons.get("duplicate") == 1
    kept_ids = {json.loads(line)["id"] for line in Path(selected.output_path).read_text().splitlines()}
    assert garbled["id"] not in kept_ids
