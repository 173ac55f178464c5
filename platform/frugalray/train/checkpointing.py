"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint directory (one Ray Train `Checkpoint`) holds
- `adapter/`: the PEFT adapter (safetensors + adapter_config.json), or `model/` for method=full;
- `train_state.pt`: full (unsharded) trainable weights, optimizer and LR-scheduler state,
  the number of optimizer steps done (the data position: `BatchPlan` is a pure function of
  the step) and the per-step history;
- `rng_rank{r}.pt`: each rank's Python / torch (/ CUDA) RNG state;
- `progress.json`: {"step": n}, so a resume can pick the latest checkpoint without unpickling.

Full state dicts (gathered to rank 0) rather than sharded ones: LoRA state is small, the
adapter must be a plain PEFT file anyway, and a run can resume with a different world size.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
PROGRESS_FILE = "progress.json"
ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def _gather_full_state(session) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable weights, optimizer state), full, on rank 0 (empty dicts on other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # Without a process group (a sweep trial) the same helpers read the plain module, in the same format.
    model_sd, optim_sd = get_state_dict(
        session.model, session.optimizer,
        options=_options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True),
    )
    # ignore_frozen_params still lets the (tied) embedding through; keep what trains.
    trainable = {name for name, p in session.model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(session, directory: str | Path) -> None:
    """Collective: every rank calls it. Rank 0 writes weights/optimizer/adapter; each rank its RNG."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = _gather_full_state(session)
    torch.save(rng_state(), directory / f"rng_rank{session.rank}.pt")
    if session.rank != 0:
        return
    torch.save(
        {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": session.scheduler.state_dict(),
            "step": session.steps_done,
            "history": session.history,
            "extras": session.extras,
            "world_size": session.world_size,
            "config": session.spec.model_dump(mode="json"),
        },
        directory / STATE_FILE,
    )
    _write_weights(session, directory, model_sd)
    (directory / PROGRESS_FILE).write_text(json.dumps({"step": session.steps_done}))


def _write_weights(session, directory: Path, model_sd: dict[str, Any]) -> None:
    if session.method == "full":
        target = directory / FULL_MODEL_DIR
        # Tied weights (lm_head = embed_tokens) appear once in a state dict; transformers re-ties.
        session.model.save_pretrained(target, state_dict=model_sd, safe_serialization=True)
        session.tokenizer.save_pretrained(target)
    else:
        session.model.save_pretrained(directory / ADAPTER_DIR, state_dict=model_sd, safe_serialization=True)


def load_training_state(session, directory: str | Path) -> None:
    """Collective: every rank reads the full state and keeps its shard."""
    import torch
    from torch.distributed.checkpoint.state_dict import set_state_dict

    directory = Path(directory)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    set_state_dict(
        session.model, session.optimizer,
        model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=_options(full_state_dict=True, strict=False),
    )
    session.scheduler.load_state_dict(state["scheduler"])
    session.steps_done = int(state["step"])
    session.history = list(state["history"])
    session.extras = dict(state.get("extras", {}))
    rng_file = directory / f"rng_rank{session.rank}.pt"
    if rng_file.is_file() and state.get("world_size") == session.world_size:
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("no RNG state for rank %d at world size %d; reseeding", session.rank, session.world_size)
    log.info("resumed from %s at step %d", directory, session.steps_done)


def checkpoint_step(directory: str | Path) -> int | None:
    path = Path(directory) / PROGRESS_FILE
    if not path.is_file() or not (Path(directory) / STATE_FILE).is_file():
        return None
    return int(json.loads(path.read_text())["step"])


def find_latest_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint directory itself, or the latest complete checkpoint anywhere under a run directory."""
    path = Path(path)
    if checkpoint_step(path) is not None:
        return path
    found = [(checkpoint_step(p.parent), str(p.parent)) for p in path.rglob(PROGRESS_FILE)]
    found = [(s, p) for s, p in found if s is not None]
    if not found:
        return None
    return Path(max(found)[1])
