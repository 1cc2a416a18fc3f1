"""Student trainer: streams teacher shards, mixes a KD divergence with cross-entropy, saves a
checkpoint that transformers and vLLM load.

Reads top to bottom: ``collate`` -> ``train`` (setup, resume, step loop, checkpoints, save).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from distill.train.config import StudentConfig, TrainConfig
from distill.train.losses import NEG, candidate_loss, candidate_scores, cross_tokenizer_loss, distillation_loss
from distill.train.student import build_student
from storage.reader import MixPosition, MixStream, Shard, ShardStream, StreamPosition
from storage.writer import atomic_write_text

FINAL_DIR = "model"
CKPT_DIR = "checkpoints"
HISTORY = "history.jsonl"


def collate(rows: Sequence[dict], k: int) -> dict[str, torch.Tensor]:
    """Pad windows to the longest in the batch and scatter the sparse labels onto positions.

    Returns ``input_ids``/``attention_mask``/``targets``/``mask`` (B, T) and
    ``topk_ids``/``teacher_logprobs`` (B, T, K); unlabelled entries hold id 0 and -inf; and,
    when some rows come from a mix's extra stream (``from_extra``: the student's own answers),
    ``kd_only`` (B, T) over their labelled positions.
    """
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    input_ids = np.zeros((B, T), np.int64)
    attention = np.zeros((B, T), np.int64)
    targets = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), bool)
    topk_ids = np.zeros((B, T, k), np.int64)
    teacher_lp = np.full((B, T, k), -np.inf, np.float32)
    for b, r in enumerate(rows):
        ids = np.asarray(r["input_ids"], np.int64)
        L, s = len(ids), int(r["label_start"])
        input_ids[b, :L] = ids
        attention[b, :L] = 1
        targets[b, : L - 1] = ids[1:]
        mask[b, s : L - 1] = True
        n = L - 1 - s
        topk_ids[b, s : L - 1] = np.asarray(r["teacher_ids"]).reshape(n, k)
        teacher_lp[b, s : L - 1] = np.asarray(r["teacher_logprobs"]).reshape(n, k)
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "targets": torch.from_numpy(targets),
        "mask": torch.from_numpy(mask),
        "topk_ids": torch.from_numpy(topk_ids),
        "teacher_logprobs": torch.from_numpy(teacher_lp),
    }
    if any(r.get("from_extra") for r in rows):
        own = torch.tensor([bool(r.get("from_extra")) for r in rows])
        batch["kd_only"] = batch["mask"] & own[:, None]
    return batch


def collate_candidates(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Candidate examples as one padded batch of prompt+candidate sequences.

    Returns ``input_ids``/``attention_mask``/``targets``/``mask`` (N, T) over the N sequences
    (``mask`` marks the candidate tokens), ``index`` (B, C) mapping each example's candidates to
    sequences (-1: padding), ``candidate_mask`` (B, C), ``teacher_logprobs`` (B, C) and
    ``answer`` (B,) (-1: no gold).
    """
    seqs, spans = [], []
    B, C = len(rows), max(len(r["candidate_ids"]) for r in rows)
    index = np.full((B, C), -1, np.int64)
    teacher = np.zeros((B, C), np.float32)
    for b, r in enumerate(rows):
        prompt = list(r["prompt_ids"])
        for c, cand in enumerate(r["candidate_ids"]):
            index[b, c] = len(seqs)
            seqs.append(prompt + list(cand))
            spans.append((len(prompt) - 1, len(prompt) - 1 + len(cand)))
        teacher[b, : len(r["teacher_logprobs"])] = r["teacher_logprobs"]
    N, T = len(seqs), max(map(len, seqs))
    input_ids, attention = np.zeros((N, T), np.int64), np.zeros((N, T), np.int64)
    targets, mask = np.zeros((N, T), np.int64), np.zeros((N, T), bool)
    for n, (seq, (lo, hi)) in enumerate(zip(seqs, spans)):
        input_ids[n, : len(seq)] = seq
        attention[n, : len(seq)] = 1
        targets[n, : len(seq) - 1] = seq[1:]
        mask[n, lo:hi] = True
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "targets": torch.from_numpy(targets),
        "mask": torch.from_numpy(mask),
        "index": torch.from_numpy(index),
        "candidate_mask": torch.from_numpy(index >= 0),
        "teacher_logprobs": torch.from_numpy(teacher),
        "answer": torch.tensor([int(r["answer"]) for r in rows], dtype=torch.int64),
    }


def collate_for(shard: Shard):
    """The collate function for a shard's labelling mode."""
    if shard.meta.mode == "candidates":
        return collate_candidates
    k = shard.meta.slots
    return lambda rows: collate(rows, k)


def batches(
    stream: ShardStream,
    batch_size: int,
    k: int,
    start: StreamPosition,
    with_ids: bool = False,
    collate_rows=None,
) -> Iterator[tuple[dict, StreamPosition]]:
    """Micro-batches and the stream position after each (for exact resume)."""
    rows, pos = [], start
    collate_rows = collate_rows or collate_for(stream.shards[0])
    for row, pos in stream.rows(start):
        rows.append(row)
        if len(rows) == batch_size:
            batch = collate_rows(rows)
            if with_ids:
                batch["row_ids"] = [(r["doc_id"], r.get("window_index", 0)) for r in rows]
            yield batch, pos
            rows = []


def _check_candidate_training(cfg: TrainConfig, shards: Sequence[Shard]) -> None:
    """Candidates data trains on the teacher's candidate distribution (forward KL) and on gold
    answers; a CE-only run needs gold answers to learn anything."""
    from distill.configbase import ConfigError

    if cfg.kd_weight > 0 and cfg.divergence != "forward_kl":
        raise ConfigError(f"train.divergence={cfg.divergence!r} is invalid for candidates data: expected forward_kl")
    if cfg.kd_weight < 1:
        gold = sum(int((s.parquet().read(columns=["answer"]).column("answer").to_numpy() >= 0).sum()) for s in shards)
        if gold == 0:
            raise ValueError(
                f"{shards[0].path}: no example has a gold answer (column 'answer' is -1 everywhere); "
                "the cross-entropy part (and the CE-only baseline) needs gold answers: add corpus.answer_column data or set train.kd_weight: 1"
            )


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


@dataclasses.dataclass
class TrainState:
    """What a checkpoint restores: weights, optimizer, every rank's RNG (CPU and device), step,
    this rank's data position and the loss history. ``model`` is the bare module (not the DDP
    wrapper); ``sharded`` when it is FSDP-sharded (FSDP2 shards the module in place).

    A checkpoint is ``checkpoints/step-<N>``: ``model.safetensors`` + ``trainer_state.pt``
    (optimizer) when unsharded, a ``torch.distributed.checkpoint`` folder ``dcp/`` (each rank
    writes its shards) when sharded, one ``rng-<rank>.pt`` per rank and ``position.json``. Every
    rank writes into one temporary folder; rank 0 commits it by rename after a barrier, so a
    crash at any moment leaves either the whole checkpoint or none."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    position: StreamPosition = StreamPosition()
    history: list = dataclasses.field(default_factory=list)
    sharded: bool = False

    def save(self, ckpt_root: Path, positions: list[StreamPosition], keep: int, rank: int = 0, world: int = 1) -> Path:
        """Write a resumable checkpoint with every rank's position (called on every rank); keeps ``keep``."""
        from safetensors.torch import save_model

        final = ckpt_root / f"step-{self.step:08d}"
        tmp = ckpt_root / f".step-{self.step:08d}.tmp-save"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash at this very step
            tmp.mkdir(parents=True)
        _barrier(world)
        torch.save(_rng_state(), tmp / f"rng-{rank:05d}.pt")
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
        _barrier(world)
        if rank == 0:
            if not self.sharded:
                save_model(self.model, str(tmp / "model.safetensors"))  # handles tied embeddings
                torch.save({"optimizer": self.optimizer.state_dict()}, tmp / "trainer_state.pt")
            (tmp / "position.json").write_text(
                json.dumps({"step": self.step, "positions": [p.to_dict() for p in positions]})
            )
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            os.replace(tmp, final)
            done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
            for old in done[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(world)
        return final

    def restore(self, ckpt_root: Path, history_path: Path, rank: int, world: int) -> Path | None:
        """Load the latest checkpoint under ``ckpt_root``, if any (called on every rank); returns it."""
        from safetensors.torch import load_model

        resume = latest_checkpoint(ckpt_root) if ckpt_root.exists() else None
        if resume is None:
            return None
        saved = json.loads((resume / "position.json").read_text())
        if len(saved["positions"]) != world:
            raise ValueError(
                f"{resume}: saved with {len(saved['positions'])} ranks, resuming with {world}; resume with the same world size"
            )
        if (resume / "dcp").is_dir() != self.sharded:
            raise ValueError(
                f"{resume}: saved {'sharded (fsdp)' if (resume / 'dcp').is_dir() else 'unsharded (ddp)'}; resume with the same train.strategy"
            )
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optimizer": optim_state}
            dcp.load(state, checkpoint_id=str(resume / "dcp"))
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
            )
        else:
            load_model(self.model, str(resume / "model.safetensors"))
            self.optimizer.load_state_dict(torch.load(resume / "trainer_state.pt", weights_only=True)["optimizer"])
        _set_rng_state(torch.load(resume / f"rng-{rank:05d}.pt", weights_only=True))
        self.step, self.position = saved["step"], type(self.position).from_dict(saved["positions"][rank])
        if history_path.exists():
            self.history = [json.loads(line) for line in history_path.read_text().splitlines()][: self.step]
        return resume


def _rng_state() -> dict:
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "position.json").exists())
    return done[-1] if done else None


def _plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "ce", "kd"):
        if any(h.get(key) for h in history):
            ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group under torchrun (gloo on CPU, nccl on
    GPU) and binds each rank to its own GPU, so collectives never meet on cuda:0."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class transformers lists in
    ``_no_split_modules`` (``LlamaDecoderLayer``, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found to shard (its _no_split_modules is {sorted(names)}); use train.strategy: ddp"
        )
    return layers


def parallelize(model: torch.nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> torch.nn.Module:
    """The module the step runs: the model itself (one process, or FSDP2, which shards the model
    in place: each decoder layer, then the root for the embeddings, norm and head) or a DDP wrapper."""
    if world == 1:
        return model
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _gradient_sync(model, enabled: bool):
    """Skip DDP's all-reduce on all but a step's last micro-batch. FSDP reduce-scatters every
    micro-batch (keeping gradients sharded is what it is for)."""
    import contextlib

    if enabled or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=True,
    )


def step_counts(micro_batches: Sequence[dict], mode: str) -> torch.Tensor:
    """What each loss term is averaged over in one optimizer step on this rank: labelled tokens
    (both terms), or for candidates data (examples, examples with a gold answer). Shape (2,)."""
    if mode == "candidates":
        return torch.tensor(
            [
                float(sum(len(b["answer"]) for b in micro_batches)),
                float(sum(int((b["answer"] >= 0).sum()) for b in micro_batches)),
            ],
            dtype=torch.float64,
        )
    if mode == "xtok":  # a student with its own tokenizer: its tokens (CE), the aligned positions (KD)
        return torch.tensor(
            [
                float(sum(int(b["mask"].sum()) for b in micro_batches)),
                float(sum(int(b["kd_mask"].sum()) for b in micro_batches)),
            ],
            dtype=torch.float64,
        )
    tokens = float(sum(int(b["mask"].sum()) for b in micro_batches))
    return torch.tensor([tokens, tokens], dtype=torch.float64)


def online_labels(teacher: torch.nn.Module, batch: dict, student_vocab: int, cfg: TrainConfig, device) -> torch.Tensor:
    """The online teacher's log-softmax over the whole vocabulary at every position (B, T, V),
    at the student's precision; ids the teacher's head lacks (a student padded beyond it) get
    probability 0."""
    with torch.no_grad(), _autocast(cfg, device):
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    teacher_logprobs = torch.log_softmax(teacher_logits.float(), dim=-1)  # (B, T, V_teacher)
    if teacher_logprobs.shape[-1] < student_vocab:
        teacher_logprobs = torch.nn.functional.pad(
            teacher_logprobs, (0, student_vocab - teacher_logprobs.shape[-1]), value=NEG
        )  # not -inf: 0 * -inf is NaN
    return teacher_logprobs


def micro_batch_loss(
    model,
    batch: dict,
    cfg: TrainConfig,
    mode: str,
    normalize: bool,
    counts: torch.Tensor,
    device,
    teacher: torch.nn.Module | None = None,
) -> tuple:
    """This micro-batch's share of the step's loss: its sums divided by the step's counts.
    ``teacher``: the KD target is its full distribution, not the batch's stored labels."""
    with _autocast(cfg, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if mode == "candidates":
        scores = candidate_scores(logits, batch["targets"], batch["mask"], batch["index"], normalize)
        return candidate_loss(
            scores,
            batch["teacher_logprobs"],
            batch["candidate_mask"],
            batch["answer"],
            cfg.kd_weight,
            cfg.temperature,
            num_examples=counts[0],
            num_gold=counts[1],
        )
    if mode == "xtok":
        return cross_tokenizer_loss(
            logits, batch, cfg.kd_weight, cfg.cross_tokenizer_loss, num_tokens=counts[0], num_aligned=counts[1]
        )
    topk_ids, teacher_logprobs = batch["topk_ids"], batch["teacher_logprobs"]
    if teacher is not None and (cfg.kd_weight > 0 or "kd_only" in batch):  # CE alone needs no teacher (as offline)
        topk_ids, teacher_logprobs = None, online_labels(teacher, batch, logits.shape[-1], cfg, device)
    return distillation_loss(
        logits,
        batch["targets"],
        topk_ids,
        teacher_logprobs,
        batch["mask"],
        kd_weight=cfg.kd_weight,
        divergence=cfg.divergence,
        tail=cfg.tail,
        temperature=cfg.temperature,
        num_tokens=counts[0],
        kd_only=batch.get("kd_only"),
        **({"beta": cfg.beta} if cfg.divergence == "jsd" else {}),
        **({"alpha": cfg.alpha} if cfg.divergence.startswith("skew") else {}),
        **({"mu": cfg.akl_mu} if cfg.divergence == "akl" else {}),
    )


def train_step(
    model,
    micro_batches: Sequence[dict],
    cfg: TrainConfig,
    mode: str,
    normalize: bool,
    world: int,
    device,
    teacher: torch.nn.Module | None = None,
) -> dict:
    """Forward and backward over one optimizer step's micro-batches; leaves the gradients in
    ``model`` and returns the step's loss, ce and kd (token-weighted means over every rank) and
    ``tokens``, the labelled tokens that every rank together processed in this step.
    ``teacher``: an online teacher (see ``train``).

    Every labelled token of the step weighs the same, however the step is split into
    micro-batches and ranks: each micro-batch's loss is its sum over tokens divided by the
    step's token count across ranks (TRL's ``num_items_in_batch``), times ``world`` because DDP
    averages gradients over ranks. Gradients are all-reduced once, on the last micro-batch.
    """
    import torch.distributed as dist

    tokens = float(sum(int(b["mask"].sum()) for b in micro_batches))
    totals = torch.cat([step_counts(micro_batches, mode), torch.tensor([tokens], dtype=torch.float64)])
    if world > 1:  # one collective for the loss denominators and the throughput count
        dist.all_reduce(totals)
    counts, tokens = totals[:2].clamp(min=1.0).float().to(device), float(totals[2])
    parts = torch.zeros(3, dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        batch = {name: t.to(device) for name, t in batch.items()}
        last = i == len(micro_batches) - 1
        with _gradient_sync(model, last or world == 1):
            loss, terms = micro_batch_loss(model, batch, cfg, mode, normalize, counts, device, teacher)
            (loss * world).backward()
        parts += torch.tensor([loss.item(), terms["ce"].item(), terms["kd"].item()], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(parts)
    return {**dict(zip(("loss", "ce", "kd"), parts.tolist())), "tokens": tokens}


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far, MiB: the device's peak allocation on CUDA, else the
    process's peak resident set (``ru_maxrss``, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names under which an already-listed parameter appears again (``lm_head.weight`` of a model
    with tied embeddings): ``save_pretrained`` stores such a weight once."""
    unique = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique


def full_state_dict(state: TrainState, skip: set[str]) -> dict | None:
    """The whole model's weights on rank 0's CPU, gathered from every rank (a collective: every
    rank calls it) when sharded, without the names in ``skip``; None when the model holds them itself."""
    if not state.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: w for name, w in weights.items() if name not in skip}


def finish(
    out_dir: Path,
    state: TrainState,
    teacher_dir,
    summary: dict,
    weights: dict | None = None,
    architecture: str | None = None,
    tokenizer=None,
) -> dict:
    """Rank 0 after the last step: loss plot, ``save_pretrained`` (safetensors + tokenizer)
    committed by rename, ``summary.json``. ``weights``: the gathered state dict of a sharded
    model; ``architecture``: its class name before sharding (FSDP2 renames the class)."""
    from transformers import AutoTokenizer

    _plot_history(state.history, out_dir / "loss.png")
    final = out_dir / FINAL_DIR
    tmp = out_dir / f".{FINAL_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    state.model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    if architecture is not None:  # what transformers and vLLM dispatch on
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = [architecture]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tokenizer or AutoTokenizer.from_pretrained(teacher_dir)).save_pretrained(
        tmp
    )  # the student's own, or the teacher's
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    summary = {
        **summary,
        "finished": True,
        "final_loss": state.history[-1]["loss"],
        "final_ce": state.history[-1]["ce"],
        "final_kd": state.history[-1]["kd"],
        "final_grad_norm": state.history[-1].get("grad_norm"),
        "peak_memory_mib": max((h.get("peak_memory_mib", 0.0) for h in state.history), default=0.0),
        "parameters": sum(p.numel() for p in state.model.parameters()),
        "model_dir": str(final),
        "strategy": "fsdp" if state.sharded else ("ddp" if summary.get("world_size", 1) > 1 else "single"),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def train(
    student_cfg: StudentConfig,
    cfg: TrainConfig,
    teacher_dir: str | Path,
    shards: Sequence[Shard],
    out_dir: str | Path,
    tokenizer_vocab: int,
    stop_after: int | None = None,
    row_log: str | Path | None = None,
    on_step: Callable[[dict], None] | None = None,
    cross=None,
    mix: tuple[Sequence[Shard], float] | None = None,
    start: StreamPosition | MixPosition | None = None,
    teacher: torch.nn.Module | None = None,
) -> dict:
    """Train a student on ``shards`` into ``out_dir/model``; resumes from ``out_dir/checkpoints``.

    Under ``torchrun --nproc_per_node=N`` (``distill.run.launch``) each rank reads a disjoint,
    equal share of row groups; gradients are all-reduced by DDP, or reduce-scattered by FSDP2
    (``cfg.strategy``); checkpoints hold every rank's data position and RNG, and rank 0 commits
    them and saves the final model. ``stop_after`` ends the run early after that many steps (with a
    checkpoint), as a crash would. ``row_log`` appends the (doc_id, window_index) of every row
    this rank trained on to ``<row_log>.rank<r>`` (for coverage checks). ``on_step`` is called on
    rank 0 after every step with its history entry plus ``tok_s`` (labelled tokens per second,
    all ranks) and ``steps`` (the run's total). ``cross``: a ``distill.train.xtok.CrossTokenizer``
    when the student has its own tokenizer (``tokenizer_vocab`` is then its size). ``mix``:
    ``(extra_shards, share)``: each row comes from ``extra_shards`` with probability ``share``,
    else from ``shards`` (``storage.reader.MixStream``; on-policy rounds mix the student's own
    answers in this way); both sets must hold the same kind of labels. Rows of
    ``extra_shards`` learn from the KD term alone (``distillation_loss``'s ``kd_only``): their
    tokens are the student's, not text to imitate. ``start``: where the data stream begins when
    ``out_dir`` holds no checkpoint (a ``MixPosition`` with ``mix``; default: its first row), so a
    run can continue another's stream (on-policy rounds); the summary's ``position`` is where this
    rank's stream ended.

    ``teacher``: online distillation, for reference runs (the trainer benchmark's full-vocabulary
    student). A causal LM over the shards' vocabulary (moved to the training device, used in eval
    mode) runs forward on every micro-batch, and its whole distribution replaces the stored
    top-k labels as the KD target; data order, token weighting, grad_accum, clipping,
    temperature, precision and seeding stay those of offline training, so a student trained this
    way differs from an offline one only in its labels. Score-mode shards only.

    Each history entry (``history.jsonl``) holds the step's loss, ce, kd and lr, ``grad_norm``
    (the gradient norm before clipping), ``tokens`` (labelled tokens over all ranks) and
    ``peak_memory_mib`` (this rank's peak so far: CUDA allocation, else resident set).
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    # setup
    out_dir, ckpt_root = Path(out_dir), Path(out_dir) / CKPT_DIR
    rank, world, device = setup_distributed()
    main = rank == 0
    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    k, mode = shards[0].meta.slots, shards[0].meta.mode
    normalize = bool(shards[0].meta.settings.get("length_normalize"))  # candidates: as the teacher scored them
    if mode == "candidates":
        _check_candidate_training(cfg, shards)
    collate_rows = None
    if cross is not None:
        if mode != "score":
            raise ValueError(
                f"{shards[0].path}: a student with its own tokenizer learns from score-mode labels, not {mode!r} ones"
            )
        from distill.train.xtok import collate_cross

        mode, collate_rows = "xtok", lambda rows: collate_cross(rows, k, cross)
    if teacher is not None:
        if mode != "score":
            raise ValueError(
                f"{shards[0].path}: an online teacher distills on score-mode labels' windows, not {mode!r} ones "
                "(and not with a student that has its own tokenizer)"
            )
        teacher = teacher.to(device).eval()
    torch.manual_seed(cfg.seed)
    model = build_student(teacher_dir, student_cfg, tokenizer_vocab, cross.tokenizer if cross is not None else None).to(
        device
    )
    model.train()
    architecture, tied = type(model).__name__, tied_names(model)
    step_model = parallelize(model, cfg, world, device)
    state = TrainState(model, build_optimizer(model, cfg), sharded=world > 1 and cfg.strategy == "fsdp")
    stream = ShardStream(
        shards, seed=cfg.seed, shuffle=cfg.shuffle, rank=rank, world_size=world, shuffle_buffer=cfg.shuffle_buffer
    )
    if mix is not None:
        extra, share = mix
        for shard in extra:
            if (shard.meta.mode, shard.meta.slots, shard.meta.vocab_size) != (
                shards[0].meta.mode,
                k,
                shards[0].meta.vocab_size,
            ):
                raise ValueError(
                    f"{shard.path}: mode {shard.meta.mode!r}, slots={shard.meta.slots}, vocabulary {shard.meta.vocab_size} cannot be "
                    f"mixed with {shards[0].path} (mode {mode!r}, slots={k}, vocabulary {shards[0].meta.vocab_size})"
                )
        stream = MixStream(
            stream,
            ShardStream(
                extra,
                seed=cfg.seed + 1,
                shuffle=cfg.shuffle,
                rank=rank,
                world_size=world,
                shuffle_buffer=cfg.shuffle_buffer,
            ),
            share,
            cfg.seed,
        )
        state.position = MixPosition()
    if start is not None:
        if type(start) is not type(state.position):
            raise ValueError(
                f"{out_dir}: start position {start} does not fit this run's stream ({type(state.position).__name__})"
            )
        state.position = start
    state.restore(ckpt_root, out_dir / HISTORY, rank, world)
    data = batches(stream, cfg.batch_size, k, state.position, with_ids=row_log is not None, collate_rows=collate_rows)
    log = open(f"{row_log}.rank{rank}", "a") if row_log is not None else None
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (cfg.progress and main), desc="train", unit="step")
    last = stop_after and min(cfg.steps, state.step + stop_after) or cfg.steps
    t_start, tokens_seen = time.perf_counter(), 0

    # the loop: one optimizer step per iteration, a checkpoint when due
    while state.step < last:
        for group in state.optimizer.param_groups:
            group["lr"] = cfg.lr_at(state.step)
        micro_batches = []
        for _ in range(cfg.grad_accum):
            batch, state.position = next(data)
            if log is not None:
                log.write("".join(f"{d}\t{w}\n" for d, w in batch.pop("row_ids")))
            micro_batches.append(batch)
        parts = train_step(step_model, micro_batches, cfg, mode, normalize, world, device, teacher)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        )
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the ranks' shards
            grad_norm = grad_norm.full_tensor()
        # loss and norm are the same on every rank (all-reduced), so every rank stops together
        if not (math.isfinite(parts["loss"]) and torch.isfinite(grad_norm)):
            raise FloatingPointError(
                f"{out_dir}: training diverged at step {state.step + 1}: loss {parts['loss']:.4g} (ce {parts['ce']:.4g}, kd {parts['kd']:.4g}), "
                f"gradient norm {float(grad_norm):.4g}; nothing of this step was saved. Lower train.lr (now {cfg.lr:g}), "
                f"keep train.max_grad_norm > 0 (now {cfg.max_grad_norm:g}), or check the labels (the shard_integrity check)"
            )
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.history.append(
            {
                "step": state.step,
                "lr": cfg.lr_at(state.step - 1),
                **parts,
                "grad_norm": float(grad_norm),
                "peak_memory_mib": peak_memory_mib(device),
            }
        )
        tokens_seen += parts["tokens"]  # every rank's, not this rank's times the world size
        tok_s = tokens_seen / (time.perf_counter() - t_start)
        bar.set_postfix(
            loss=f"{parts['loss']:.3f}", ce=f"{parts['ce']:.3f}", kd=f"{parts['kd']:.3f}", tok_s=f"{tok_s:.0f}"
        )
        bar.update(1)
        if on_step is not None and main:
            on_step({**state.history[-1], "tok_s": tok_s, "steps": cfg.steps})
        if (
            cfg.checkpoint_every
            and state.step % cfg.checkpoint_every == 0
            or (stop_after and state.step == last < cfg.steps)
        ):
            if log is not None:
                log.flush()
                os.fsync(log.fileno())
            positions = [state.position]
            if world > 1:
                positions = [None] * world
                dist.all_gather_object(positions, state.position)
            if main:
                atomic_write_text(out_dir / HISTORY, "".join(json.dumps(h) + "\n" for h in state.history))
            state.save(ckpt_root, positions, cfg.keep_checkpoints, rank, world)
    bar.close()
    if log is not None:
        log.close()
    _barrier(world)

    # the final model (rank 0; a sharded model is gathered from every rank first)
    weights = full_state_dict(state, tied) if state.step >= cfg.steps else None
    if not main:
        _barrier(world)
        return {"steps": state.step, "finished": state.step >= cfg.steps, "rank": rank}
    atomic_write_text(out_dir / HISTORY, "".join(json.dumps(h) + "\n" for h in state.history))
    if state.step < cfg.steps:
        _barrier(world)
        return {"steps": state.step, "finished": False}
    summary = finish(
        out_dir,
        state,
        teacher_dir,
        {
            "steps": state.step,
            "labelled_tokens_this_run": int(tokens_seen),
            "online_teacher": teacher is not None,
            "seconds_this_run": time.perf_counter() - t_start,
            "world_size": world,
            "position": state.position.to_dict(),
        },
        weights=weights,
        architecture=architecture if state.sharded else None,
        tokenizer=cross.tokenizer if cross is not None else None,
    )
    _barrier(world)  # no rank leaves (and torchrun reports success) before the model is saved
    return summary
