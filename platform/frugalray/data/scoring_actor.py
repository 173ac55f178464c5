"""The scoring actor: `RowScorer`, a Ray Data callable class that adds every requested per-row
signal to a batch of rows (`score.run_score` runs a fixed pool of them).

Each actor loads the tokenizer, and the model when a model signal is asked for, once and reuses
them for every batch. A row is tokenized once, the way training sees it
(`formatting.tokenize_example`), and gets as few passes as its signals allow; `n_tokens`
(tokens of the whole text, after truncation) and `n_loss_tokens` are always written:
- `perplexity`: exp(mean NLL) over the response tokens (over all tokens when the row has no
  prompt), the same tokens training puts a loss on; columns `perplexity`, `mean_nll`. A row
  whose response is truncated away entirely (prompt longer than `max_length`) gets
  `n_loss_tokens = 0` and a NaN perplexity; `select` never keeps those;
- `ifd`: instruction-following difficulty = mean NLL(response | prompt) / mean NLL(response
  alone) (Li et al. 2023). The conditional NLL is the perplexity pass (shared); the
  unconditional one is a second pass over the response tokens with nothing before them (so
  their first token is not predicted, as in the paper's code). Columns `ifd`, `mean_nll`,
  `mean_nll_response_alone`; NaN for rows without a prompt or with the response truncated;
- `grand`: GraNd-style L2 norm of the gradient of the row's mean response NLL w.r.t. fresh
  LoRA parameters (seeded; lora_B starts at zero, so the gradient w.r.t. lora_B is a seeded
  random projection of the full weight gradient and lora_A's is zero). One backward per row;
  column `grand`;
- `heuristics`: model-free text signals (`signals.heuristic_scores`): `prompt_chars`,
  `response_chars`, `garbage_ratio`, `repetition_ratio`, `degenerate_reason`;
- `verifier`: for verifiable tasks, whether the response states the row's reference answer
  (`signals.answer_correct`): `answer_correct` 1.0 / 0.0, null for a row without a reference;
- `dynamics`: every row under each checkpoint of the proxy fine-tune (`data.dynamics`), loaded as
  PEFT adapters of one model copy: `el2n`, `dyn_loss_mean`, `dyn_loss_var`, `forgetting_events`,
  `dyn_acc_mean`;
- `influence`: LESS-style cosine between a row's randomly projected LoRA gradient and the mean
  projected gradient of the target set (`data.influence`): `influence`.

Only the labelled positions go through the LM head and the cross-entropy: on a 49k-token
vocabulary the logits of every position would dominate both time and memory.

`device="cuda"` (an actor placed on a GPU by `score.place_scorers`): the actor first checks that
CUDA is there (`devices.require_cuda`: a GPU node whose torch sees none would otherwise score on
its CPU, silently), then holds its models on the GPU; per-row results come back to the CPU.
"""

from __future__ import annotations

import math

from pydantic import Field

from frugalray.config import StrictModel
from frugalray.data.dynamics import summarize_dynamics, token_error_stats
from frugalray.data.influence import InfluenceSettings, cosine_to, project, target_direction
from frugalray.data.score_columns import COLUMN_TYPES, MODEL_SCORERS, SCORER_COLUMNS
from frugalray.data.signals import answer_correct, heuristic_scores
from frugalray.devices import require_cuda
from frugalray.examples.formatting import IGNORE_INDEX, pad_batch, tokenize_example
from frugalray.models import load_causal_lm, load_config, load_tokenizer

# Labelled positions whose logits are computed at once: 128 x a 49k vocabulary in fp32 is 24 MiB.
NLL_CHUNK_POSITIONS = 128


class GrandSettings(StrictModel):
    """The fresh LoRA whose gradient norm the `grand` scorer measures."""

    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    seed: int = Field(default=0, description="seeds the LoRA init, so norms are comparable across runs")


class RowScorer:
    """Ray Data callable class: one tokenizer (and model, when a model signal is asked for) per
    actor, reused for every batch; computes every requested per-row signal of a batch.

    `dynamics`: {"checkpoints": [adapter dirs], "chunk_tokens": int}; `influence`:
    {"settings": InfluenceSettings fields, "targets": [[prompt, response], ...]};
    `answer_column`: the batch column holding the reference answers (`verifier`).
    `device`: "cpu", or "cuda" for an actor placed on a GPU (`placed_for`: the resources it was
    placed with, for the error when no CUDA device is there).
    """

    device = "cpu"

    def __init__(
        self,
        model_path: str,
        max_length: int,
        dtype: str = "float32",
        torch_threads: int | None = None,
        scorers: tuple[str, ...] = ("perplexity",),
        grand: dict | None = None,
        dynamics: dict | None = None,
        influence: dict | None = None,
        answer_column: str | None = None,
        device: str = "cpu",
        placed_for: dict | None = None,
    ):
        import torch

        if device == "cuda":
            require_cuda("score", placed_for=placed_for)
        self.device = device
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.scorers = tuple(scorers)
        self.answer_column = answer_column
        self.tokenizer = load_tokenizer(model_path)
        self.max_length = max_length
        self.pad_id = self.tokenizer.pad_token_id
        self.model = None
        self.fast_path = False
        if set(self.scorers) & {"perplexity", "ifd", "grand"}:
            self.model = self._load(model_path, dtype).eval()
        if set(self.scorers) & set(MODEL_SCORERS):
            config = load_config(model_path)
            # The fast path applies the LM head to labelled positions only; models that post-process
            # logits (soft-capping) go through the full forward instead.
            self.fast_path = (
                not getattr(config, "final_logit_softcapping", None)
                and getattr(config, "logit_scale", None) in (None, 1, 1.0)
            )
        self.lora_params = []
        if "grand" in self.scorers:
            from peft import LoraConfig, get_peft_model

            settings = GrandSettings(**(grand or {}))
            torch.manual_seed(settings.seed)
            # Injected in place: with lora_B at zero every forward pass is unchanged, so the other
            # signals computed on `self.model` are those of the reference model.
            get_peft_model(self.model, LoraConfig(
                r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                target_modules=settings.target_modules, task_type="CAUSAL_LM",
            ))
            self.lora_params = [p for p in self.model.parameters() if p.requires_grad]
        if "dynamics" in self.scorers:
            from peft import PeftModel

            # One model copy; each proxy checkpoint is a named adapter switched per pass.
            paths = list(dynamics["checkpoints"])
            # PEFT puts each adapter on its base layer's device.
            self.dyn_model = PeftModel.from_pretrained(
                self._load(model_path, dtype), paths[0], adapter_name="ckpt0"
            ).eval()
            for i, path in enumerate(paths[1:], start=1):
                self.dyn_model.load_adapter(path, adapter_name=f"ckpt{i}")
            self.dyn_names = [f"ckpt{i}" for i in range(len(paths))]
            self.dyn_chunk = int(dynamics.get("chunk_tokens", 512))
        if "influence" in self.scorers:
            self.inf = InfluenceSettings(**influence["settings"])
            base = self._load(model_path, dtype).eval()
            if self.inf.adapter_path:
                from peft import PeftModel

                self.inf_model = PeftModel.from_pretrained(base, self.inf.adapter_path, is_trainable=True).eval()
            else:
                from peft import LoraConfig, get_peft_model

                torch.manual_seed(self.inf.seed)
                self.inf_model = get_peft_model(base, LoraConfig(
                    r=self.inf.lora_rank, lora_alpha=self.inf.lora_alpha, lora_dropout=0.0,
                    target_modules=self.inf.target_modules, task_type="CAUSAL_LM",
                )).eval()
            # Name order fixes which gradient entry meets which projection row, in every process.
            self.inf_params = [p for _, p in sorted(self.inf_model.named_parameters()) if p.requires_grad]
            targets = [self._tokenize(p, r) for p, r in influence["targets"]]
            self.inf_direction = target_direction(self._influence_features(targets))

    def _load(self, model_path: str, dtype: str):
        model = load_causal_lm(model_path, dtype=dtype)
        return model.to(self.device) if self.device != "cpu" else model

    def _tokenize(self, prompt: str, response: str) -> dict:
        return tokenize_example(self.tokenizer, prompt, response, self.max_length)

    def _pad(self, examples: list[dict]) -> dict:
        """A padded batch on the actor's device."""
        batch = pad_batch(examples, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()} if self.device != "cpu" else batch

    def _positions(self, model, batch: dict):
        """Hidden states of every labelled next-token position, their targets, each one's row
        index, loss tokens per row, and the head that turns hidden states into logits."""
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        targets = labels[:, 1:]  # position t predicts token t+1
        selected = targets != IGNORE_INDEX
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        if self.fast_path and hf.get_output_embeddings() is not None and hasattr(hf, "get_decoder"):
            hidden = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            hidden, head = hidden[:, :-1][selected], hf.get_output_embeddings()
        else:
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][selected]
            head = lambda x: x  # these are the logits already
        return hidden, targets[selected], selected.nonzero()[:, 0], selected.sum(dim=1).tolist(), head

    def _token_nll(self, batch: dict, model=None):
        """NLL of every labelled next-token position (a flat tensor) and its row index."""
        import torch
        import torch.nn.functional as F

        hidden, targets, row_of_token, n_loss, head = self._positions(model if model is not None else self.model, batch)
        # A chunk of positions at a time: the whole batch's float logits (positions x vocab) would be
        # hundreds of MiB, freshly mapped and page-faulted on every batch; a chunk's stay under glibc's
        # mmap threshold and their memory is reused (measured: a third less system time, same NLLs).
        nll = torch.cat([
            F.cross_entropy(head(hidden[i:i + NLL_CHUNK_POSITIONS]).float(), targets[i:i + NLL_CHUNK_POSITIONS],
                            reduction="none")
            for i in range(0, hidden.shape[0], NLL_CHUNK_POSITIONS)
        ]) if hidden.shape[0] else hidden.new_zeros(0, dtype=torch.float32)
        return nll, row_of_token, n_loss

    def _mean_nll(self, examples: list[dict]) -> tuple[list[float], list[int]]:
        import torch

        with torch.inference_mode():
            nll, row_of_token, n_loss = self._token_nll(self._pad(examples))
            sums = torch.zeros(len(examples), dtype=torch.float64).index_add_(0, row_of_token.cpu(), nll.double().cpu())
        return [s / n if n else math.nan for s, n in zip(sums.tolist(), n_loss)], n_loss

    def _grad_norm(self, example: dict) -> float:
        import torch

        nll, _, n_loss = self._token_nll(self._pad([example]))
        if not n_loss[0]:
            return math.nan
        grads = torch.autograd.grad(nll.mean(), self.lora_params)
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))

    def _dynamics(self, examples: list[dict]) -> list[dict]:
        import torch

        batch = self._pad(examples)
        per_ckpt = []
        with torch.inference_mode():
            for name in self.dyn_names:
                self.dyn_model.set_adapter(name)
                hidden, targets, row_of_token, _, head = self._positions(self.dyn_model, batch)
                per_ckpt.append(token_error_stats(hidden, head, targets, self.dyn_chunk))
        out = []
        for i in range(len(examples)):
            mine = row_of_token == i
            out.append(summarize_dynamics(
                [c[0][mine].tolist() for c in per_ckpt], [c[1][mine].tolist() for c in per_ckpt],
                [c[2][mine].tolist() for c in per_ckpt],
            ))
        return out

    def _influence_features(self, examples: list[dict]):
        """[rows, dim] projected LoRA gradients (a zero row where a row has no loss token)."""
        import torch

        n_params = sum(p.numel() for p in self.inf_params)
        grads = torch.zeros(len(examples), n_params, dtype=torch.float32)
        for i, example in enumerate(examples):
            nll, _, n_loss = self._token_nll(self._pad([example]), model=self.inf_model)
            if n_loss[0]:
                flat = torch.autograd.grad(nll.mean(), self.inf_params)
                grads[i] = torch.cat([g.reshape(-1) for g in flat]).float().cpu()
        return project(grads, self.inf.dim, self.inf.seed)

    def score(self, prompts: list[str], responses: list[str], answers: list | None = None) -> dict[str, list]:
        """Every requested signal of each row, plus token counts. `answers`: each row's reference
        answer (None where it has none), for the verifier."""
        examples = [self._tokenize(p, r) for p, r in zip(prompts, responses)]
        out: dict[str, list] = {
            "n_tokens": [len(e["input_ids"]) for e in examples],
            # Next-token positions with a label (the first token is never predicted).
            "n_loss_tokens": [sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples],
        }
        if "perplexity" in self.scorers or "ifd" in self.scorers:
            mean_nll, _ = self._mean_nll(examples)
            out["mean_nll"] = mean_nll
            if "perplexity" in self.scorers:
                out["perplexity"] = [math.exp(m) if n else math.nan for m, n in zip(mean_nll, out["n_loss_tokens"])]
            if "ifd" in self.scorers:
                alone = [self._tokenize("", r) for r in responses]
                alone_nll, _ = self._mean_nll(alone)
                out["mean_nll_response_alone"] = alone_nll
                out["ifd"] = [
                    c / a if p and n and math.isfinite(c) and a > 0 else math.nan
                    for c, a, p, n in zip(mean_nll, alone_nll, prompts, out["n_loss_tokens"])
                ]
        if "grand" in self.scorers:
            out["grand"] = [self._grad_norm(e) for e in examples]
        if "heuristics" in self.scorers:
            rows = [heuristic_scores(p, r) for p, r in zip(prompts, responses)]
            for name in SCORER_COLUMNS["heuristics"]:
                out[name] = [row[name] for row in rows]
        if "verifier" in self.scorers:
            references = answers if answers is not None else [None] * len(responses)
            out["answer_correct"] = [answer_correct(r, a) for r, a in zip(responses, references)]
        if "dynamics" in self.scorers:
            rows = self._dynamics(examples)
            for name in SCORER_COLUMNS["dynamics"]:
                out[name] = [row[name] for row in rows]
        if "influence" in self.scorers:
            out["influence"] = cosine_to(self._influence_features(examples), self.inf_direction)
        return out

    def __call__(self, batch):  # a pyarrow.Table: nested columns pass through untouched
        import pyarrow as pa

        answers = None
        if "verifier" in self.scorers and self.answer_column in batch.column_names:
            answers = batch.column(self.answer_column).to_pylist()
        scores = self.score(batch.column("prompt").to_pylist(), batch.column("response").to_pylist(), answers)
        for name, values in scores.items():
            column = pa.array(values, type=getattr(pa, COLUMN_TYPES[name])())
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, column)
            else:
                batch = batch.append_column(name, column)
        return batch
