"""Student trainer: streams teacher shards, mixes a KD divergence with cross-entropy, saves a
checkpoint that transformers and vLLM load.

Reads top to bottom, as torchtune's recipes do: batches (``collate``, ``batches``) -> what a batch
holds (``BatchKind``) -> one step's loss and gradients (``StepLoss``, ``micro_batch_loss``,
``forward_backward``) -> processes, model and optimizer -> the checkpointed state (``TrainState``)
-> the recipe (``DistillRecipe``: ``setup``, ``step``, ``save_checkpoint``, ``finish``,
``cleanup``) -> ``train``, the function the run layer calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import resource
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from tqdm.auto import tqdm
from transformers import AutoProcessor, AutoTokenizer

from distill.train.config import StudentConfig, TrainConfig
from distill.train.features import HEADS_FILE, FeatureHeads, FeatureSpec, feature_pairs
from distill.train.losses import (
    NEG,
    LossSpec,
    candidate_loss,
    candidate_scores,
    cross_tokenizer_loss,
    distillation_loss,
    feature_distance,
    masked_mean,
)
from distill.train.student import build_student
from distill.train.xtok import CrossTokenizer, collate_cross
from distill.vision import PixelInputs, pixel_args
from storage.images import ImageStore
from storage.kinds import features as feature_kind
from storage.reader import MixPosition, MixStream, Shard, ShardStream, StreamPosition
from storage.writer import atomic_write_text

FINAL_DIR = "model"
CKPT_DIR = "checkpoints"
HEADS_OPTIMIZER = "feature_heads_optimizer.pt"
HISTORY = "history.jsonl"


def collate(rows: Sequence[dict], k: int, features: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Pad windows to the longest in the batch and scatter the sparse labels onto positions.

    Returns ``input_ids``/``attention_mask``/``targets``/``mask`` (B, T) and
    ``teacher_ids``/``teacher_logprobs`` (B, T, K); unlabelled entries hold id 0 and -inf; and,
    when some rows come from a mix's extra stream (``from_extra``: the student's own answers),
    ``kd_only`` (B, T) over their labelled positions. ``features`` (layers, dim): the rows' stored
    teacher features too, ``teacher_features`` (B, T, layers, dim), zero where unlabelled.
    """
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    input_ids = np.zeros((B, T), np.int64)
    attention = np.zeros((B, T), np.int64)
    targets = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), bool)
    teacher_ids = np.zeros((B, T, k), np.int64)
    teacher_lp = np.full((B, T, k), -np.inf, np.float32)
    teacher_features = np.zeros((B, T, *features), np.float32) if features else None
    for b, r in enumerate(rows):
        ids = np.asarray(r["input_ids"], np.int64)
        L, s = len(ids), int(r["label_start"])
        input_ids[b, :L] = ids
        attention[b, :L] = 1
        targets[b, : L - 1] = ids[1:]
        mask[b, s : L - 1] = True
        n = L - 1 - s
        teacher_ids[b, s : L - 1] = np.asarray(r["teacher_ids"]).reshape(n, k)
        teacher_lp[b, s : L - 1] = np.asarray(r["teacher_logprobs"]).reshape(n, k)
        if features:
            teacher_features[b, s : L - 1] = np.asarray(r["teacher_features"]).reshape(n, *features)
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "targets": torch.from_numpy(targets),
        "mask": torch.from_numpy(mask),
        "teacher_ids": torch.from_numpy(teacher_ids),
        "teacher_logprobs": torch.from_numpy(teacher_lp),
    }
    if features:
        batch["teacher_features"] = torch.from_numpy(teacher_features)
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


def collate_for(shard: Shard, features: bool = False, pixels: PixelInputs | None = None):
    """The collate function for a shard's labelling mode; ``features``: with its stored teacher
    features (only a loss with a feature term reads them); ``pixels``: the image inputs of rows
    that name their image (``distill.vision.PixelInputs``; needed when the shard's rows do)."""
    if shard.meta.mode == "candidates":
        return collate_candidates
    k, shape = shard.meta.slots, feature_kind.shape(shard.meta.features) if features else None
    if shard.meta.images:
        if pixels is None:
            raise ValueError(
                f"{shard.path}: its rows name images (a vision-language teacher's labels), and no image store was given"
            )
        return lambda rows: {**collate(rows, k, shape), **pixels([r["image"] for r in rows])}
    return lambda rows: collate(rows, k, shape)


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


class BatchKind(enum.Enum):
    """What a training batch holds, which fixes how it is collated, its loss and what a step counts."""

    WINDOWS = "windows"
    """Token windows in the teacher's tokenization with labels per position (score or generate
    labels: top-k, sampled, ensemble): ``collate``, ``distillation_loss``."""
    ALIGNED_WINDOWS = "aligned_windows"
    """The same windows re-tokenized for a student with its own tokenizer, the teacher's labels
    at byte-aligned positions: ``distill.train.xtok.collate_cross``, ``cross_tokenizer_loss``."""
    CANDIDATES = "candidates"
    """A prompt and its candidate answers with the teacher's distribution over them:
    ``collate_candidates``, ``candidate_loss``."""

    @property
    def unit(self) -> str:
        """What a step's throughput counts: labelled ``tokens``, or ``examples`` of candidates data.
        The history entry's field and the summary's ``labelled_<unit>_this_run`` carry this name."""
        return "examples" if self is BatchKind.CANDIDATES else "tokens"

    @classmethod
    def of(cls, shard: Shard, cross: CrossTokenizer | None, online_teacher: bool) -> BatchKind:
        """The kind of batches ``shard`` trains, for a student with its own tokenizer (``cross``) or
        an online teacher; refuses the combinations that have no loss."""
        mode = shard.meta.mode
        if online_teacher and cross is not None:
            raise ValueError(
                f"{shard.path}: an online teacher distills a student that shares its tokenizer, not one with its own"
            )
        if online_teacher and mode != "score":
            raise ValueError(
                f"{shard.path}: an online teacher distills on score-mode labels' windows, not {mode!r} ones"
            )
        if cross is not None and mode != "score":
            raise ValueError(
                f"{shard.path}: a student with its own tokenizer learns from score-mode labels, not {mode!r} ones"
            )
        if mode == "candidates":
            return cls.CANDIDATES
        return cls.ALIGNED_WINDOWS if cross is not None else cls.WINDOWS


@dataclasses.dataclass(frozen=True)
class StepLoss:
    """What the loss of a step needs, bound once from the ``train`` section and the data.

    ``spec``: the KD + CE mix (divergence with its options, tail, temperature, KD weight);
    ``cross_tokenizer_loss``: the KD term for aligned windows; ``length_normalize``: candidates
    are scored as the teacher scored them (mean token logprob rather than the sum);
    ``precision``: ``TrainConfig.precision`` (autocast); ``features``: the feature term, when
    ``train.feature_weight`` > 0 (``distill.train.features``)."""

    kind: BatchKind
    spec: LossSpec
    cross_tokenizer_loss: str = "span_kl"
    length_normalize: bool = False
    precision: str = "auto"
    features: FeatureSpec | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig, kind: BatchKind, length_normalize: bool = False) -> StepLoss:
        return cls(kind, LossSpec.from_config(cfg), cfg.cross_tokenizer_loss, length_normalize, cfg.precision)


def _autocast(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _gradient_sync(model, enabled: bool):
    """Skip DDP's all-reduce on all but a step's last micro-batch. FSDP reduce-scatters every
    micro-batch (keeping gradients sharded is what it is for)."""
    if enabled or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def step_counts(micro_batches: Sequence[dict], kind: BatchKind) -> torch.Tensor:
    """This rank's counts for one optimizer step, shape (3,): what the CE term is averaged over,
    what the KD term is averaged over, and what the step processed (``kind.unit``).

    Windows: labelled tokens, all three. Aligned windows: the student's tokens of the labelled
    span (CE and processed) and the aligned positions (KD). Candidates: examples with a gold
    answer (CE), examples (KD and processed)."""
    if kind is BatchKind.CANDIDATES:
        examples = float(sum(len(b["answer"]) for b in micro_batches))
        gold = float(sum(int((b["answer"] >= 0).sum()) for b in micro_batches))
        return torch.tensor([gold, examples, examples], dtype=torch.float64)
    tokens = float(sum(int(b["mask"].sum()) for b in micro_batches))
    if kind is BatchKind.ALIGNED_WINDOWS:
        aligned = float(sum(int(b["kd_mask"].sum()) for b in micro_batches))
        return torch.tensor([tokens, aligned, tokens], dtype=torch.float64)
    return torch.tensor([tokens, tokens, tokens], dtype=torch.float64)


def online_labels(
    teacher: torch.nn.Module, batch: dict, student_vocab: int, precision: str, device: torch.device
) -> torch.Tensor:
    """The online teacher's log-softmax over the whole vocabulary at every position (B, T, V),
    at the student's precision; ids the teacher's head lacks (a student padded beyond it) get
    probability 0."""
    with torch.no_grad(), _autocast(precision, device):
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
    loss: StepLoss,
    counts: torch.Tensor,
    device: torch.device,
    teacher: torch.nn.Module | None = None,
    heads: FeatureHeads | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the step's loss: its sums divided by the step's ``counts``
    (``step_counts``: CE denominator, KD denominator). ``teacher``: the KD target is its full
    distribution, not the batch's stored labels. ``heads``: with ``loss.features``, the maps of
    the student's hidden states; the feature term (``feat``) is added with its weight."""
    with _autocast(loss.precision, device):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=loss.features is not None,
            **pixel_args(batch),
        )
    logits = out.logits
    ce_count, kd_count = counts[0], counts[1]
    if loss.kind is BatchKind.CANDIDATES:
        scores = candidate_scores(logits, batch["targets"], batch["mask"], batch["index"], loss.length_normalize)
        return candidate_loss(
            scores,
            batch["teacher_logprobs"],
            batch["candidate_mask"],
            batch["answer"],
            loss.spec.kd_weight,
            loss.spec.temperature,
            num_examples=kd_count,
            num_gold=ce_count,
        )
    if loss.kind is BatchKind.ALIGNED_WINDOWS:
        return cross_tokenizer_loss(
            logits, batch, loss.spec.kd_weight, loss.cross_tokenizer_loss, num_tokens=ce_count, num_aligned=kd_count
        )
    teacher_ids, teacher_logprobs = batch["teacher_ids"], batch["teacher_logprobs"]
    if teacher is not None and (loss.spec.kd_weight > 0 or "kd_only" in batch):  # CE alone needs no teacher
        teacher_ids, teacher_logprobs = None, online_labels(teacher, batch, logits.shape[-1], loss.precision, device)
    value, terms = distillation_loss(
        logits,
        batch["targets"],
        teacher_ids,
        teacher_logprobs,
        batch["mask"],
        loss.spec,
        num_tokens=ce_count,
        kd_only=batch.get("kd_only"),
    )
    if loss.features is not None:
        distances = [
            feature_distance(mapped, batch["teacher_features"][:, :, t], loss.features.kind)
            for mapped, t in heads(out.hidden_states)
        ]
        feat = sum(masked_mean(d, batch["mask"], ce_count) for d in distances) / len(distances)
        value = value + loss.features.weight * feat
        terms["feat"] = feat.detach()
    return value, terms


def forward_backward(
    model,
    micro_batches: Sequence[dict],
    loss: StepLoss,
    world: int,
    device: torch.device,
    teacher: torch.nn.Module | None = None,
    heads: FeatureHeads | None = None,
) -> dict:
    """Forward and backward over one optimizer step's micro-batches; leaves the gradients in
    ``model`` (and ``heads``) and returns the step's loss, ce and kd (and feat, with a feature
    term; means over every rank) and, under the name ``loss.kind.unit``, what every rank together
    processed in this step (labelled tokens, or examples). ``teacher``: an online teacher (see
    ``train``). ``heads`` sit outside the model's DDP or FSDP wrapper: their gradients are
    all-reduced here, once per step.

    Every labelled token (or example) of the step weighs the same, however the step is split
    into micro-batches and ranks: each micro-batch's loss is its sum divided by the step's count
    across ranks (TRL's ``num_items_in_batch``), times ``world`` because DDP averages gradients
    over ranks. Gradients are all-reduced once, on the last micro-batch.
    """
    totals = step_counts(micro_batches, loss.kind)
    if world > 1:  # one collective for the loss denominators and the throughput count
        dist.all_reduce(totals)
    counts, processed = totals[:2].clamp(min=1.0).float().to(device), float(totals[2])
    names = ("loss", "ce", "kd", "feat") if loss.features is not None else ("loss", "ce", "kd")
    parts = torch.zeros(len(names), dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        batch = {name: t.to(device) for name, t in batch.items()}
        last = i == len(micro_batches) - 1
        with _gradient_sync(model, last or world == 1):
            value, terms = micro_batch_loss(model, batch, loss, counts, device, teacher, heads)
            (value * world).backward()
        parts += torch.tensor([value.item(), *(terms[n].item() for n in names[1:])], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(parts)
        for p in heads.parameters() if heads is not None else ():
            dist.all_reduce(p.grad)
            p.grad /= world  # what DDP's average does for the model's own parameters
    return {**dict(zip(names, parts.tolist())), loss.kind.unit: processed}


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group under torchrun (gloo on CPU, nccl on
    GPU) and binds each rank to its own GPU, so collectives never meet on cuda:0."""
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


def teardown_distributed() -> None:
    """End this process's part in the group ``setup_distributed`` started, on success: a barrier,
    then ``destroy_process_group``. Without the barrier a rank that finishes first tears its gloo
    connections down while another still uses them, and the C++ side aborts the process
    (``terminate called without an active exception``, exit -6; seen about 1 run in 25 here)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class transformers lists in
    ``_no_split_modules`` (``LlamaDecoderLayer``, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found to shard (its _no_split_modules is {sorted(names)}); "
            "use train.strategy: ddp"
        )
    return layers


def parallelize(model: torch.nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> torch.nn.Module:
    """The module the step runs: the model itself (one process, or FSDP2, which shards the model
    in place: each decoder layer, then the root for the embeddings, norm and head) or a DDP wrapper."""
    if world == 1:
        return model
    if cfg.strategy == "fsdp":
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


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


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far, MiB: the device's peak allocation on CUDA, else the
    process's peak resident set (``ru_maxrss``, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names under which an already-listed parameter appears again (``lm_head.weight`` of a model
    with tied embeddings): ``save_pretrained`` stores such a weight once."""
    unique = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique


def check_gold_answers(cfg: TrainConfig, shards: Sequence[Shard]) -> None:
    """Candidates data: the cross-entropy part (and a CE-only run) learns from gold answers, so
    some example must have one unless the KD term takes all the weight."""
    if cfg.kd_weight >= 1:
        return
    gold = sum(int((s.parquet().read(columns=["answer"]).column("answer").to_numpy() >= 0).sum()) for s in shards)
    if gold == 0:
        raise ValueError(
            f"{shards[0].path}: no example has a gold answer (column 'answer' is -1 everywhere); the "
            "cross-entropy part (and the CE-only baseline) needs gold answers: add corpus.answer_column data or "
            "set train.kd_weight: 1"
        )


def check_mixable(shards: Sequence[Shard], extra: Sequence[Shard]) -> None:
    """A mix's extra shards hold the same kind of labels as the main ones."""
    first = shards[0].meta
    for shard in extra:
        if (shard.meta.mode, shard.meta.slots, shard.meta.vocab_size) != (first.mode, first.slots, first.vocab_size):
            raise ValueError(
                f"{shard.path}: mode {shard.meta.mode!r}, slots={shard.meta.slots}, vocabulary {shard.meta.vocab_size} "
                f"cannot be mixed with {shards[0].path} (mode {first.mode!r}, slots={first.slots}, "
                f"vocabulary {first.vocab_size})"
            )


@dataclasses.dataclass
class TrainState:
    """What a checkpoint restores: weights, optimizer, every rank's RNG (CPU and device), step,
    this rank's data position and the loss history. ``model`` is the bare module (not the DDP
    wrapper); ``sharded`` when it is FSDP-sharded (FSDP2 shards the module in place).

    A checkpoint is ``checkpoints/step-<N>``: ``model.safetensors`` + ``trainer_state.pt``
    (optimizer) when unsharded, a ``torch.distributed.checkpoint`` folder ``dcp/`` (each rank
    writes its shards) when sharded, one ``rng-<rank>.pt`` per rank and ``position.json``. Every
    rank writes into one temporary folder; rank 0 commits it by rename after a barrier, so a
    crash at any moment leaves either the whole checkpoint or none. With feature distillation,
    the maps and their optimizer too: ``feature_heads.safetensors`` and ``feature_heads_optimizer.pt``
    (rank 0's; every rank holds the same maps)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    position: StreamPosition = StreamPosition()
    history: list = dataclasses.field(default_factory=list)
    sharded: bool = False
    heads: FeatureHeads | None = None
    heads_optimizer: torch.optim.Optimizer | None = None
    stored_layers: tuple[int, ...] = ()
    """The shards' stored teacher layers (named in the saved maps' metadata)."""

    def save(self, ckpt_root: Path, positions: list[StreamPosition], keep: int, rank: int = 0, world: int = 1) -> Path:
        """Write a resumable checkpoint with every rank's position (called on every rank); keeps ``keep``."""
        final = ckpt_root / f"step-{self.step:08d}"
        tmp = ckpt_root / f".step-{self.step:08d}.tmp-save"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash at this very step
            tmp.mkdir(parents=True)
        _barrier(world)
        torch.save(_rng_state(), tmp / f"rng-{rank:05d}.pt")
        if self.sharded:
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
        _barrier(world)
        if rank == 0:
            if not self.sharded:
                save_model(self.model, str(tmp / "model.safetensors"))  # handles tied embeddings
                torch.save({"optimizer": self.optimizer.state_dict()}, tmp / "trainer_state.pt")
            if self.heads is not None:
                self.heads.save(tmp / HEADS_FILE, self.stored_layers)
                torch.save({"optimizer": self.heads_optimizer.state_dict()}, tmp / HEADS_OPTIMIZER)
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
        resume = latest_checkpoint(ckpt_root) if ckpt_root.exists() else None
        if resume is None:
            return None
        saved = json.loads((resume / "position.json").read_text())
        if len(saved["positions"]) != world:
            raise ValueError(
                f"{resume}: saved with {len(saved['positions'])} ranks, resuming with {world}; "
                "resume with the same world size"
            )
        if (resume / "dcp").is_dir() != self.sharded:
            raise ValueError(
                f"{resume}: saved {'sharded (fsdp)' if (resume / 'dcp').is_dir() else 'unsharded (ddp)'}; "
                "resume with the same train.strategy"
            )
        if self.sharded:
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optimizer": optim_state}
            dcp.load(state, checkpoint_id=str(resume / "dcp"))
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
            )
        else:
            load_model(self.model, str(resume / "model.safetensors"))
            self.optimizer.load_state_dict(torch.load(resume / "trainer_state.pt", weights_only=True)["optimizer"])
        if self.heads is not None:
            if not (resume / HEADS_FILE).exists():
                raise ValueError(
                    f"{resume}: saved without feature maps (train.feature_weight was 0); resume with the same "
                    "train.feature_weight, or train into a fresh folder"
                )
            self.heads.load(resume / HEADS_FILE)
            saved_heads = torch.load(resume / HEADS_OPTIMIZER, weights_only=True)
            self.heads_optimizer.load_state_dict(saved_heads["optimizer"])
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
        dist.barrier()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "position.json").exists())
    return done[-1] if done else None


def _plot_history(history: list[dict], path: Path) -> None:
    """The loss curves, ``loss.png``. matplotlib is imported here, lazily: only rank 0's final
    save draws, and the GPU check runs the trainer in an environment without matplotlib
    (``benchmarks/gpu_trainer_check.py`` replaces this function there)."""
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend, no figure left open

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key in ("loss", "ce", "kd", "feat"):
        if any(h.get(key) for h in history):
            ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def full_state_dict(state: TrainState, skip: set[str]) -> dict | None:
    """The whole model's weights on rank 0's CPU, gathered from every rank (a collective: every
    rank calls it) when sharded, without the names in ``skip``; None when the model holds them itself."""
    if not state.sharded:
        return None
    weights = get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: w for name, w in weights.items() if name not in skip}


class DistillRecipe:
    """One training run of a student, as torchtune's distillation recipe reads: ``setup`` (processes,
    model and optimizer, data stream, the latest checkpoint), ``step`` (one optimizer step -> its
    metrics), ``save_checkpoint``, ``finish`` (the final model and summary) and ``cleanup``.
    ``run`` is the loop; ``train`` builds a recipe and runs it. Arguments as in ``train``.

    ``benchmarks/trainer.py`` times ``step`` on batches of its own after ``setup_processes`` and
    ``setup_model``, so the benchmark's step is the trainer's."""

    def __init__(
        self,
        student_cfg: StudentConfig,
        cfg: TrainConfig,
        teacher_dir: str | Path,
        shards: Sequence[Shard],
        out_dir: str | Path,
        tokenizer_vocab: int,
        *,
        cross: CrossTokenizer | None = None,
        mix: tuple[Sequence[Shard], float] | None = None,
        start: StreamPosition | MixPosition | None = None,
        teacher: torch.nn.Module | None = None,
        row_log: str | Path | None = None,
        on_step: Callable[[dict], None] | None = None,
        images: ImageStore | None = None,
    ):
        self.student_cfg, self.cfg, self.teacher_dir = student_cfg, cfg, teacher_dir
        self.images = images
        self.shards, self.out_dir, self.tokenizer_vocab = shards, Path(out_dir), tokenizer_vocab
        self.ckpt_root = self.out_dir / CKPT_DIR
        self.cross, self.mix, self.start, self.teacher = cross, mix, start, teacher
        self.row_log_path, self.on_step = row_log, on_step
        self.kind = BatchKind.of(shards[0], cross, online_teacher=teacher is not None)
        # candidates: scored as the teacher scored them (length-normalized or not)
        normalize = bool(shards[0].meta.settings.get("length_normalize"))
        self.loss = StepLoss.from_config(cfg, self.kind, normalize)
        self.row_log = self.bar = None

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Processes, data checks, model and optimizer, the data stream, then the latest checkpoint
        under ``out_dir`` (if any) and the batches from the position it saved."""
        self.setup_processes()
        if self.main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        if self.kind is BatchKind.CANDIDATES:
            check_gold_answers(self.cfg, self.shards)
        if self.mix is not None:
            check_mixable(self.shards, self.mix[0])
        self.setup_model()
        self.setup_data()
        self.restore_checkpoint()
        k = self.shards[0].meta.slots
        collate_rows = (
            (lambda rows: collate_cross(rows, k, self.cross))
            if self.cross is not None
            else collate_for(
                self.shards[0],
                features=self.loss.features is not None,
                pixels=PixelInputs(self.teacher_dir, self.images) if self.shards[0].meta.images else None,
            )
        )
        self.data = batches(
            self.stream,
            self.cfg.batch_size,
            k,
            self.state.position,
            with_ids=self.row_log_path is not None,
            collate_rows=collate_rows,
        )
        if self.row_log_path is not None:
            self.row_log = open(f"{self.row_log_path}.rank{self.rank}", "a")
        self.bar = tqdm(
            total=self.cfg.steps,
            initial=self.state.step,
            disable=not (self.cfg.progress and self.main),
            desc="train",
            unit="step",
        )
        self.started, self.processed = time.perf_counter(), 0.0  # this run's clock and count (all ranks)

    def setup_processes(self) -> None:
        """Rank, world size and device (a process group under torchrun); torch's CPU threads."""
        self.rank, self.world, self.device = setup_distributed()
        self.main = self.rank == 0
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)

    def setup_model(self) -> None:
        """The student (seeded), its parallel wrapper, the optimizer; the online teacher on the device."""
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.device).eval()
        torch.manual_seed(self.cfg.seed)
        own_tokenizer = self.cross.tokenizer if self.cross is not None else None
        self.model = build_student(self.teacher_dir, self.student_cfg, self.tokenizer_vocab, own_tokenizer)
        self.model = self.model.to(self.device)
        self.model.train()
        self.architecture, self.tied = type(self.model).__name__, tied_names(self.model)
        heads = self.setup_features()
        self.step_model = parallelize(self.model, self.cfg, self.world, self.device)
        sharded = self.world > 1 and self.cfg.strategy == "fsdp"
        self.state = TrainState(self.model, build_optimizer(self.model, self.cfg), sharded=sharded)
        if heads is not None:
            self.state.heads, self.state.heads_optimizer = heads, build_optimizer(heads, self.cfg)
            self.state.stored_layers = tuple(self.shards[0].meta.features["layers"])

    def setup_features(self) -> FeatureHeads | None:
        """With ``train.feature_weight`` > 0: the mapped layers (``distill.train.features``), the
        feature term of the loss and the maps (seeded, on the device); every shard must store the
        same features."""
        if self.cfg.feature_weight == 0:
            return None
        first = self.shards[0]
        if self.kind is not BatchKind.WINDOWS or not first.meta.features:
            raise ValueError(
                f"{first.path}: train.feature_weight={self.cfg.feature_weight} needs shards with teacher features "
                "(teacher.features) and windows the student shares the teacher's tokens with"
            )
        for shard in self.shards:
            if shard.meta.features != first.meta.features:
                raise ValueError(
                    f"{shard.path}: teacher features {shard.meta.features} differ from {first.path}'s "
                    f"{first.meta.features}"
                )
        stored = first.meta.features["layers"]
        teacher_layers = json.loads((Path(self.teacher_dir) / "config.json").read_text())["num_hidden_layers"]
        config = self.model.config
        pairs = feature_pairs(
            self.student_cfg.feature_layers, stored, teacher_layers, config.num_hidden_layers, str(first.path)
        )
        self.loss = dataclasses.replace(
            self.loss, features=FeatureSpec(pairs, self.cfg.feature_weight, self.cfg.feature_loss)
        )
        torch.manual_seed(self.cfg.seed + 1)
        return FeatureHeads(pairs, config.hidden_size, int(first.meta.features["dim"])).to(self.device)

    def setup_data(self) -> None:
        """This rank's stream over the shards (mixed with ``mix``'s extra shards) and its start."""
        cfg = self.cfg
        self.stream = ShardStream(
            self.shards,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            rank=self.rank,
            world_size=self.world,
            shuffle_buffer=cfg.shuffle_buffer,
        )
        if self.mix is not None:
            extra, share = self.mix
            extra_stream = ShardStream(
                extra,
                seed=cfg.seed + 1,
                shuffle=cfg.shuffle,
                rank=self.rank,
                world_size=self.world,
                shuffle_buffer=cfg.shuffle_buffer,
            )
            self.stream = MixStream(self.stream, extra_stream, share, cfg.seed)
            self.state.position = MixPosition()
        if self.start is not None:
            if type(self.start) is not type(self.state.position):
                raise ValueError(
                    f"{self.out_dir}: start position {self.start} does not fit this run's stream "
                    f"({type(self.state.position).__name__})"
                )
            self.state.position = self.start

    # -- the step -------------------------------------------------------------------------------

    def next_micro_batches(self) -> list[dict]:
        """The next optimizer step's ``grad_accum`` micro-batches; logs their rows with ``row_log``."""
        micro_batches = []
        for _ in range(self.cfg.grad_accum):
            batch, self.state.position = next(self.data)
            if self.row_log is not None:
                self.row_log.write("".join(f"{d}\t{w}\n" for d, w in batch.pop("row_ids")))
            micro_batches.append(batch)
        return micro_batches

    def step(self, micro_batches: Sequence[dict]) -> dict:
        """One optimizer step on ``micro_batches``: the learning rate of this step, forward and
        backward, clipping, AdamW. Returns its history entry: step, lr, loss, ce, kd, what it
        processed (``tokens`` or ``examples``, all ranks), ``grad_norm`` (before clipping) and
        ``peak_memory_mib``. Raises ``FloatingPointError``, updating nothing, on a non-finite
        loss or gradient norm (the same on every rank: both are all-reduced)."""
        cfg, state = self.cfg, self.state
        lr = cfg.lr_at(state.step)
        optimizers = [state.optimizer] + ([state.heads_optimizer] if state.heads is not None else [])
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        parts = forward_backward(
            self.step_model, micro_batches, self.loss, self.world, self.device, self.teacher, state.heads
        )
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if state.heads is not None:  # the maps are clipped on their own: the reported norm stays the student's
            torch.nn.utils.clip_grad_norm_(state.heads.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the ranks' shards
            grad_norm = grad_norm.full_tensor()
        if not (math.isfinite(parts["loss"]) and torch.isfinite(grad_norm)):
            raise FloatingPointError(
                f"{self.out_dir}: training diverged at step {state.step + 1}: loss {parts['loss']:.4g} "
                f"(ce {parts['ce']:.4g}, kd {parts['kd']:.4g}), gradient norm {float(grad_norm):.4g}; nothing of "
                f"this step was saved. Lower train.lr (now {cfg.lr:g}), keep train.max_grad_norm > 0 "
                f"(now {cfg.max_grad_norm:g}), or check the labels (the shard_integrity check)"
            )
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.step += 1
        entry = {"step": state.step, "lr": lr, **parts, "grad_norm": float(grad_norm)}
        entry["peak_memory_mib"] = peak_memory_mib(self.device)
        state.history.append(entry)
        return entry

    def report(self, entry: dict) -> None:
        """Progress bar and ``on_step`` (rank 0) with this run's throughput so far."""
        unit = self.kind.unit
        self.processed += entry[unit]  # every rank's, not this rank's times the world size
        rate = self.processed / (time.perf_counter() - self.started)
        rate_name = "tok_s" if unit == "tokens" else f"{unit}_s"
        terms = {name: f"{entry[name]:.3f}" for name in ("loss", "ce", "kd", "feat") if name in entry}
        self.bar.set_postfix(**terms, **{rate_name: f"{rate:.0f}"})
        self.bar.update(1)
        if self.on_step is not None and self.main:
            self.on_step({**entry, rate_name: rate, "steps": self.cfg.steps})

    # -- checkpoints ----------------------------------------------------------------------------

    def restore_checkpoint(self) -> Path | None:
        """Weights, optimizer, RNG, step, data position and history of the latest checkpoint."""
        return self.state.restore(self.ckpt_root, self.out_dir / HISTORY, self.rank, self.world)

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint of this step (a collective: every rank calls it), after the
        history it covers and the rows it has trained on are on disk."""
        if self.row_log is not None:
            self.row_log.flush()
            os.fsync(self.row_log.fileno())
        positions = [self.state.position]
        if self.world > 1:
            positions = [None] * self.world
            dist.all_gather_object(positions, self.state.position)
        if self.main:
            self.write_history()
        return self.state.save(self.ckpt_root, positions, self.cfg.keep_checkpoints, self.rank, self.world)

    def write_history(self) -> None:
        atomic_write_text(self.out_dir / HISTORY, "".join(json.dumps(h) + "\n" for h in self.state.history))

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> dict:
        """Steps until ``cfg.steps`` (or ``stop_after`` more, ending with a checkpoint, as a crash
        would end it), a checkpoint every ``cfg.checkpoint_every``; then ``finish``."""
        cfg = self.cfg
        last = min(cfg.steps, self.state.step + stop_after) if stop_after else cfg.steps
        while self.state.step < last:
            self.report(self.step(self.next_micro_batches()))
            every = cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0
            if every or (stop_after and self.state.step == last < cfg.steps):
                self.save_checkpoint()
        return self.finish()

    def finish(self) -> dict:
        """After the last step: the history, and on rank 0 the final model and ``summary.json``
        once ``cfg.steps`` are done (a sharded model is gathered from every rank first). Returns
        the summary; an unfinished run or another rank returns its step count."""
        self.cleanup()
        _barrier(self.world)
        finished = self.state.step >= self.cfg.steps
        weights = full_state_dict(self.state, self.tied) if finished else None
        if not self.main:
            _barrier(self.world)
            return {"steps": self.state.step, "finished": finished, "rank": self.rank}
        self.write_history()
        if not finished:
            _barrier(self.world)
            return {"steps": self.state.step, "finished": False}
        summary = self.save_final_model(weights)
        _barrier(self.world)  # no rank leaves (and torchrun reports success) before the model is saved
        return summary

    def save_final_model(self, weights: dict | None) -> dict:
        """Rank 0: loss plot, ``save_pretrained`` (safetensors + tokenizer) committed by rename,
        ``summary.json``. ``weights``: the gathered state dict of a sharded model, whose config
        gets back the class name it had before sharding (FSDP2 renames the class)."""
        state, out_dir = self.state, self.out_dir
        _plot_history(state.history, out_dir / "loss.png")
        final = out_dir / FINAL_DIR
        tmp = out_dir / f".{FINAL_DIR}.tmp-{uuid.uuid4().hex[:8]}"
        state.model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        if state.sharded:  # what transformers and vLLM dispatch on
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config["architectures"] = [self.architecture]
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # the student's own tokenizer, or the teacher's (with its image processor, for a vision-language model)
        if self.cross is not None:
            self.cross.tokenizer.save_pretrained(tmp)
        elif (Path(self.teacher_dir) / "processor_config.json").exists():
            AutoProcessor.from_pretrained(self.teacher_dir).save_pretrained(tmp)
        else:
            AutoTokenizer.from_pretrained(self.teacher_dir).save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if state.heads is not None:  # beside the model, not in it: the export stays a plain causal LM
            heads_tmp = out_dir / f".{HEADS_FILE}.tmp-{uuid.uuid4().hex[:8]}"
            state.heads.save(heads_tmp, state.stored_layers)
            os.replace(heads_tmp, out_dir / HEADS_FILE)
        last = state.history[-1]
        summary = {
            "steps": state.step,
            f"labelled_{self.kind.unit}_this_run": int(self.processed),
            "online_teacher": self.teacher is not None,
            "seconds_this_run": time.perf_counter() - self.started,
            "world_size": self.world,
            "position": state.position.to_dict(),
            "finished": True,
            "final_loss": last["loss"],
            "final_ce": last["ce"],
            "final_kd": last["kd"],
            "final_grad_norm": last.get("grad_norm"),
            **({"final_feat": last["feat"], "feature_heads": str(out_dir / HEADS_FILE)} if "feat" in last else {}),
            "peak_memory_mib": max((h.get("peak_memory_mib", 0.0) for h in state.history), default=0.0),
            "parameters": sum(p.numel() for p in state.model.parameters()),
            "model_dir": str(final),
            "strategy": "fsdp" if state.sharded else ("ddp" if self.world > 1 else "single"),
        }
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def cleanup(self) -> None:
        """Close the progress bar and the row log (idempotent: ``train`` calls it on errors too)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.row_log is not None:
            self.row_log.close()
            self.row_log = None


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
    cross: CrossTokenizer | None = None,
    mix: tuple[Sequence[Shard], float] | None = None,
    start: StreamPosition | MixPosition | None = None,
    teacher: torch.nn.Module | None = None,
    images: ImageStore | None = None,
) -> dict:
    """Train a student on ``shards`` into ``out_dir/model``; resumes from ``out_dir/checkpoints``
    (``DistillRecipe``: setup, the step loop, finish).

    Under ``torchrun --nproc_per_node=N`` (``distill.run.launch``) each rank reads a disjoint,
    equal share of row groups; gradients are all-reduced by DDP, or reduce-scattered by FSDP2
    (``cfg.strategy``); checkpoints hold every rank's data position and RNG, and rank 0 commits
    them and saves the final model. ``stop_after`` ends the run early after that many steps (with a
    checkpoint), as a crash would. ``row_log`` appends the (doc_id, window_index) of every row
    this rank trained on to ``<row_log>.rank<r>`` (for coverage checks). ``on_step`` is called on
    rank 0 after every step with its history entry plus the run's throughput so far (all ranks:
    ``tok_s``, labelled tokens per second, or ``examples_s`` for candidates data) and ``steps``
    (the run's total). ``cross``: a ``distill.train.xtok.CrossTokenizer`` when the student has its
    own tokenizer (``tokenizer_vocab`` is then its size). ``mix``: ``(extra_shards, share)``: each
    row comes from ``extra_shards`` with probability ``share``, else from ``shards``
    (``storage.reader.MixStream``; on-policy rounds mix the student's own answers in this way);
    both sets must hold the same kind of labels. Rows of ``extra_shards`` learn from the KD term
    alone (``distillation_loss``'s ``kd_only``): their tokens are the student's, not text to
    imitate. ``start``: where the data stream begins when ``out_dir`` holds no checkpoint (a
    ``MixPosition`` with ``mix``; default: its first row), so a run can continue another's stream
    (on-policy rounds); the summary's ``position`` is where this rank's stream ended.

    ``teacher``: online distillation, for reference runs (the trainer benchmark's full-vocabulary
    student). A causal LM over the shards' vocabulary (moved to the training device, used in eval
    mode) runs forward on every micro-batch, and its whole distribution replaces the stored
    top-k labels as the KD target; data order, token weighting, grad_accum, clipping,
    temperature, precision and seeding stay those of offline training, so a student trained this
    way differs from an offline one only in its labels. Score-mode shards only.

    ``images``: the image store of shards whose rows name their image (a vision-language teacher's
    labels): each batch gets the images' pixel inputs, processed by the teacher's image processor.

    Each history entry (``history.jsonl``) holds the step's loss, ce, kd and lr, ``grad_norm``
    (the gradient norm before clipping), ``tokens`` (labelled tokens over all ranks; ``examples``
    for candidates data) and ``peak_memory_mib`` (this rank's peak so far: CUDA allocation, else
    resident set). The summary counts ``labelled_tokens_this_run`` (``labelled_examples_this_run``).
    """
    recipe = DistillRecipe(
        student_cfg,
        cfg,
        teacher_dir,
        shards,
        out_dir,
        tokenizer_vocab,
        cross=cross,
        mix=mix,
        start=start,
        teacher=teacher,
        row_log=row_log,
        on_step=on_step,
        images=images,
    )
    try:
        recipe.setup()
        return recipe.run(stop_after)
    finally:
        recipe.cleanup()
