"""pass_rate: k vLLM samples per row inside Ray Data, checked against HF greedy decoding.

At temperature 0 every sample is the greedy answer, so each row's pass rate is 0 or 1 and must
equal whether transformers' own greedy `generate` answers the row correctly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from frugalray.examples.answers import is_correct
from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows
from frugalray.data.score import ScoreConfig, run_score


@pytest.mark.slow  # a vLLM-CPU engine start in a Ray actor: about 1 min alone, several on a busy box
@pytest.mark.timeout(900)
def test_pass_rate_with_vllm_in_ray_data_matches_hf_greedy(ray_cluster, default_model_path, tmp_path):
    import torch

    from frugalray.examples.formatting import chat_prompt_text
    from frugalray.models import load_causal_lm, load_tokenizer

    rows = generate_tasks(GenerateConfig(n_rows=4, max_digits=1, seed=3))
    data = write_rows(rows, tmp_path / "tasks.jsonl")
    cfg = ScoreConfig(
        model=default_model_path, input_path=str(data), output_path=str(tmp_path / "scored"), batch_size=4,
        max_length=128, scorers=["pass_rate"],
        pass_rate={"k": 2, "max_tokens": 8, "temperature": 0.0, "max_model_len": 256,
                   "engine_kwargs": {"dtype": "float32"}},
    )
    result = run_score(cfg, tmp_path / "run")
    scored = {r["id"]: r for r in pq.read_table(result.output_path).to_pylist()}
    assert len(scored) == 4

    tok = load_tokenizer(default_model_path)
    model = load_causal_lm(default_model_path).eval()
    for row in rows:
        got = scored[row["id"]]
        ids = tok(chat_prompt_text(tok, row["instruction"]), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert got["pass_rate"] == (1.0 if is_correct(greedy, row) else 0.0), (row["instruction"], greedy)
        assert got["difficulty_bucket"] == ("easy" if got["pass_rate"] == 1.0 else "hard")
        assert 2 <= got["pass_gen_tokens"] <= 16
    sidecar = json.loads(Path(result.sidecar_path).read_text())
    assert sidecar["scorers"]["pass_rate"]["flops"] > 0 and sidecar["scorers"]["pass_rate"]["settings"]["k"] == 2
