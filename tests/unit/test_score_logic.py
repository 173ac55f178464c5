"""Scoring logic without Ray or a model: EL2N chunking, dynamics summaries, the influence
projection, shard planning, the resume fingerprint and output preparation, length quarantine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from frugalray.config import ConfigError, parse_config
from frugalray.data.dynamics import DynamicsSettings, summarize_dynamics, token_error_stats
from frugalray.data.influence import cosine_to, project, projection_matrix, target_direction
from frugalray.data.score import ScoreConfig
from frugalray.data.score_shards import (
    MANIFEST_NAME,
    plan_shards,
    prepare_output,
    score_fingerprint,
    write_shard,
)


def test_token_error_stats_match_a_full_softmax_loop_at_any_chunk_size():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (37,), generator=gen)
    with torch.no_grad():
        logits = head(hidden).double()
    # Independent: the definition, one position at a time, in float64.
    expected = []
    for t in range(37):
        p = torch.softmax(logits[t], dim=-1)
        onehot = torch.zeros(50, dtype=torch.float64)
        onehot[targets[t]] = 1
        expected.append((-math.log(p[targets[t]]), float((p - onehot).norm()), int(p.argmax()) == int(targets[t])))
    for chunk in (1, 5, 64):
        with torch.no_grad():
            nll, el2n, correct = token_error_stats(hidden, head, targets, chunk)
        assert nll.tolist() == pytest.approx([e[0] for e in expected], rel=1e-4)
        assert el2n.tolist() == pytest.approx([e[1] for e in expected], rel=1e-4, abs=1e-6)
        assert correct.tolist() == [e[2] for e in expected]


def test_summarize_dynamics_on_hand_values():
    nll = [[1.0, 3.0], [2.0, 2.0], [0.0, 1.0]]  # row mean loss per checkpoint: 2, 2, 0.5
    el2n = [[0.5, 0.5], [0.25, 0.75], [0.0, 0.2]]
    correct = [[True, True], [False, True], [True, False]]  # token 0: forgotten once; token 1: once
    out = summarize_dynamics(nll, el2n, correct)
    assert out["dyn_loss_mean"] == pytest.approx(1.5)
    assert out["dyn_loss_var"] == pytest.approx(((0.5**2) * 2 + 1.0**2) / 3)
    assert out["el2n"] == pytest.approx((0.5 + 0.5 + 0.1) / 3)
    assert out["forgetting_events"] == 2
    assert out["dyn_acc_mean"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    empty = summarize_dynamics([[], []], [[], []], [[], []])
    assert math.isnan(empty["el2n"]) and empty["forgetting_events"] == 0


def test_dynamics_checkpoints_must_increase():
    with pytest.raises(ConfigError, match="checkpoints"):
        parse_config(DynamicsSettings, {"checkpoints": [2, 1]})
    assert parse_config(DynamicsSettings, {"checkpoints": [0, 3]}).checkpoints == [0, 3]


def test_projection_is_deterministic_blockwise_and_keeps_cosines():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(4, 3000, generator=gen)  # 3000: not a multiple of the generation block
    a = project(grads, 256, seed=7)
    assert torch.equal(a, project(grads, 256, seed=7))
    assert torch.allclose(a[2:3], project(grads[2:3], 256, seed=7), atol=1e-4)  # batch-independent (up to BLAS rounding)
    assert not torch.allclose(a, project(grads, 256, seed=8))
    full = projection_matrix(3000, 256, seed=7)
    assert full.shape == (3000, 256)
    assert torch.allclose(a, grads @ full, atol=1e-4)
    # Johnson-Lindenstrauss: cosines survive a 2048-dim projection to a few hundredths.
    wide = project(grads, 2048, seed=3)
    raw = torch.nn.functional.cosine_similarity(grads[0:1], grads[1:], dim=1)
    kept = torch.nn.functional.cosine_similarity(wide[0:1], wide[1:], dim=1)
    assert (raw - kept).abs().max() < 0.1


def test_target_direction_and_cosine():
    targets = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 0.0]])  # a zero row (no loss token) is skipped
    direction = target_direction(targets)
    assert direction.tolist() == pytest.approx([0.5, 0.5])
    cos = cosine_to(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]), direction)
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(math.sqrt(0.5)) and math.isnan(cos[2])
    with pytest.raises(ValueError, match="zero gradient"):
        target_direction(torch.zeros(2, 3))


def _rows(n: int) -> list[dict]:
    return [{"source_index": i, "id": f"r{i}", "prompt": f"q{i}", "response": f"a{i}"} for i in range(n)]


def test_plan_shards_keys_rows_by_source_position():
    rows = [r for r in _rows(10) if r["source_index"] not in (3, 4)]  # quarantined rows leave gaps
    shards = plan_shards(rows, 3)
    assert {k: [r["source_index"] for r in v] for k, v in shards.items()} == {0: [0, 1, 2], 1: [5], 2: [6, 7, 8], 3: [9]}


def test_fingerprint_tracks_scores_not_runtime_knobs(tmp_path):
    cfg = ScoreConfig(input_path="in.jsonl", output_path=str(tmp_path / "out"))
    base = score_fingerprint(cfg, "/m", _rows(3))
    assert base == score_fingerprint(cfg.model_copy(update={"batch_size": 2, "num_actors": 2}), "/m", _rows(3))
    assert base != score_fingerprint(cfg.model_copy(update={"max_length": 64}), "/m", _rows(3))
    assert base != score_fingerprint(cfg.model_copy(update={"scorers": ["heuristics"]}), "/m", _rows(3))
    assert base != score_fingerprint(cfg, "/m", _rows(4))
    changed = _rows(3)
    changed[1]["response"] = "other"
    assert base != score_fingerprint(cfg, "/m", changed)


def test_prepare_output_resumes_matching_runs_only(tmp_path):
    import pyarrow as pa

    out = tmp_path / "out"
    assert prepare_output(out, "fp1", resume=True) == set()
    assert json.loads((out / MANIFEST_NAME).read_text())["fingerprint"] == "fp1"
    write_shard(out, 0, pa.table({"x": [1]}))
    write_shard(out, 2, pa.table({"x": [2]}))
    (out / ".shard-00001.parquet.99.tmp").write_bytes(b"half written")
    assert prepare_output(out, "fp1", resume=True) == {0, 2}
    assert not list(out.glob(".*"))  # the half-written shard is gone
    assert prepare_output(out, "fp1", resume=False) == set() and not list(out.glob("shard-*"))
    write_shard(out, 0, pa.table({"x": [1]}))
    assert prepare_output(out, "fp2", resume=True) == set() and not list(out.glob("shard-*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="output_path: .*not an earlier scoring output"):
        prepare_output(tmp_path / "mine", "fp1", resume=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_score_config_cross_field_checks():
    with pytest.raises(ConfigError, match="influence.target_path"):
        parse_config(ScoreConfig, {"input_path": "a", "output_path": "b", "scorers": ["influence"]})
    with pytest.raises(ConfigError, match="max_tokens"):
        parse_config(ScoreConfig, {"input_path": "a", "output_path": "b", "max_tokens": 600, "max_length": 512})
    with pytest.raises(ConfigError, match="shard_rows"):
        parse_config(ScoreConfig, {"input_path": "a", "output_path": "b", "shard_rows": 0})


class _CharTokenizer:
    """One token per character, no chat template: enough to count lengths."""

    chat_template = None
    eos_token = "$"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_quarantine_over_length_counts_template_and_response_tokens():
    from frugalray.data.score import quarantine_over_length

    rows = [
        {"source_index": 0, "id": "a", "prompt": "hi", "response": "yes", "extra": 1},  # "hi\n" + "yes$" = 7
        {"source_index": 1, "id": "b", "prompt": "hello", "response": "a long answer"},  # 6 + 14 = 20
        {"source_index": 2, "id": "c", "prompt": "", "response": "1234567"},  # 8
    ]
    kept, over = quarantine_over_length(rows, _CharTokenizer(), max_tokens=8)
    assert [r["id"] for r in kept] == ["a", "c"]
    (q,) = over
    assert q["id"] == "b" and q["source_index"] == 1
    assert q["quarantine_reason"] == "too long: 20 tokens > max_tokens 8"


def test_pass_rate_and_difficulty_buckets():
    from frugalray.data.difficulty import PassRateSettings, difficulty_bucket, pass_rate_of

    assert pass_rate_of(["The answer is 12.", "12", "13", "no idea"], "12") == 0.5
    assert pass_rate_of(["-3"], -3) == 1.0
    assert math.isnan(pass_rate_of(["12"], None)) and math.isnan(pass_rate_of(["12"], ""))
    assert [difficulty_bucket(x) for x in (1.0, 0.75, 0.5, 0.25, 0.0)] == ["easy", "easy", "medium", "hard", "hard"]
    assert difficulty_bucket(math.nan) == ""
    with pytest.raises(ConfigError, match="hard_at"):
        parse_config(PassRateSettings, {"easy_at": 0.3, "hard_at": 0.5})


def test_batches_sort_by_token_count_not_characters():
    from frugalray.data.score_shards import _length_key

    rows = [
        {"id": "b", "prompt": "a", "response": "bcd"},  # 4 characters; "a\n" + "bcd$" = 6 tokens
        {"id": "a", "prompt": "", "response": "1234"},  # 4 characters; "1234$" = 5 tokens
        {"id": "c", "prompt": "hello", "response": "a long answer"},  # 6 + 14 = 20 tokens
    ]
    key = _length_key(_CharTokenizer(), max_length=16)
    assert [r["id"] for r in sorted(rows, key=key)] == ["a", "b", "c"]
    assert [key(r) for r in rows] == [6, 5, 16]  # a truncated row pads like any max_length row
    by_characters = _length_key(None, 16)  # no tokenizer (no model scorer): characters
    assert [r["id"] for r in sorted(rows, key=by_characters)] == ["b", "a", "c"]


def test_chunked_token_nll_matches_one_full_cross_entropy():
    """Batches of more than NLL_CHUNK_POSITIONS labelled positions: chunking changes no NLL."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from frugalray.examples.formatting import IGNORE_INDEX, pad_batch
    from frugalray.data.scoring_actor import NLL_CHUNK_POSITIONS, RowScorer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    scorer = object.__new__(RowScorer)  # the scoring methods only, without loading a model from disk
    scorer.model, scorer.fast_path, scorer.pad_id = model, True, 0
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n_prompt, n_response in [(20, 90), (5, 120), (40, 3)]:  # 210 labelled positions
        ids = torch.randint(1, 97, (n_prompt + n_response,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    batch = pad_batch(examples, 0)
    assert sum(len(e["input_ids"]) - e["labels"].count(IGNORE_INDEX) for e in examples) > NLL_CHUNK_POSITIONS
    with torch.inference_mode():
        nll, row_of_token, n_loss = scorer._token_nll(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        full = F.cross_entropy(logits.reshape(-1, 97), batch["labels"][:, 1:].reshape(-1), reduction="none",
                               ignore_index=IGNORE_INDEX).view(3, -1)
    selected = batch["labels"][:, 1:] != IGNORE_INDEX
    assert n_loss == selected.sum(1).tolist() == [90, 120, 3]
    assert torch.equal(row_of_token, selected.nonzero()[:, 0])
    torch.testing.assert_close(nll, full[selected], rtol=1e-5, atol=1e-6)
