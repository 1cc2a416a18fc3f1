"""The student and train sections of a run config. Plain dataclasses (no torch), validated when
built; the loss names here are the keys of ``distill.train.losses``' tables."""

from __future__ import annotations

import dataclasses
import math

from distill.configbase import check

TAILS = ("renormalize", "bucket")
CROSS_TOKENIZER_LOSSES = ("uld", "span_kl")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "akl")
STRATEGIES = ("ddp", "fsdp")
FEATURE_LOSSES = ("mse", "cosine")
INITS = ("teacher_layers", "random", "checkpoint")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    init: str = "teacher_layers"
    """``teacher_layers``: copy ``num_layers`` of the teacher's layers (embeddings, norm and head too);
    ``random``: fresh weights with the architecture below; ``checkpoint``: load ``checkpoint``."""
    num_layers: int = 4
    """Number of transformer layers of the student."""
    layer_indices: tuple[int, ...] | None = None
    """Which teacher layers to copy (``teacher_layers``); default: evenly spaced, first and last included."""
    hidden_size: int | None = None
    """Hidden size (``random`` only; default: the teacher's)."""
    intermediate_size: int | None = None
    """MLP size (``random`` only; default: the teacher's)."""
    num_attention_heads: int | None = None
    """Attention heads (``random`` only; default: the teacher's)."""
    num_key_value_heads: int | None = None
    """Key/value heads (``random`` only; default: the teacher's)."""
    checkpoint: str | None = None
    """Local checkpoint folder (``checkpoint`` only); must share the teacher's tokenizer."""
    seed: int = 0
    """Seed for random initialization."""
    tokenizer: str | None = None
    """None: the teacher's tokenizer. Otherwise the student has its own: a local tokenizer folder,
    or ``bpe:N`` for a byte-level BPE of N ids trained on the training split with the
    ``tokenizers`` library (built once, cached under ``<root>/tokenizers``). Its labels are the
    teacher's, aligned by bytes (``distill.train.xtok``) and compared with ``train.cross_tokenizer_loss``;
    the evaluation compares it with the teacher in bits per byte. Needs ``init: random`` (or a
    ``checkpoint`` with that tokenizer) and ``score`` mode."""

    feature_layers: tuple[tuple[int, int], ...] = ()
    """Feature distillation (``train.feature_weight``): pairs ``[student layer, teacher layer]``,
    numbered as transformers' ``output_hidden_states`` numbers them (0: the embeddings, ``l``: after
    ``l`` decoder layers, the layer count: after the final norm); each teacher layer must be one of
    ``teacher.features.layers``. A learned linear map per pair takes the student's hidden state to
    the stored features' ``dim``. Default: each captured teacher layer ``t`` is learned by student
    layer ``round(t * num_layers / teacher layers)``."""

    def __post_init__(self):
        check(self.init in INITS, "init", self.init, f"one of {INITS}")
        object.__setattr__(self, "feature_layers", tuple((int(s), int(t)) for s, t in self.feature_layers))
        students = [s for s, _ in self.feature_layers]
        check(
            all(s >= 0 for s in students) and len(set(students)) == len(students),
            "feature_layers",
            [list(p) for p in self.feature_layers],
            "pairs [student layer, teacher layer], each student layer >= 0 and at most once",
        )
        check(
            self.init == "checkpoint" or all(s <= self.num_layers for s in students),
            "feature_layers",
            [list(p) for p in self.feature_layers],
            f"student layers in [0, {self.num_layers}] (num_layers)",
        )
        check(self.num_layers >= 1, "num_layers", self.num_layers, "an integer >= 1")
        if self.layer_indices is not None:
            object.__setattr__(self, "layer_indices", tuple(int(i) for i in self.layer_indices))
            check(
                len(self.layer_indices) == self.num_layers,
                "layer_indices",
                self.layer_indices,
                f"{self.num_layers} indices (num_layers)",
            )
        check(
            self.init != "checkpoint" or bool(self.checkpoint),
            "checkpoint",
            self.checkpoint,
            "a folder when init is 'checkpoint'",
        )
        if self.tokenizer is not None:
            check(
                self.init != "teacher_layers",
                "tokenizer",
                self.tokenizer,
                "null with init: teacher_layers (the copied embeddings are the teacher's vocabulary); use init: random",
            )
            if self.tokenizer.startswith("bpe:"):
                check(
                    self.tokenizer[4:].isdigit() and int(self.tokenizer[4:]) >= 300,
                    "tokenizer",
                    self.tokenizer,
                    "bpe:N with N >= 300 (256 bytes plus merges), or a tokenizer folder",
                )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Windows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine decay)."""
    warmup_steps: int = 0
    """Linear warm-up steps; 0: 5% of ``steps``."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    kd_weight: float = 0.5
    """Weight of the KD term; ``1 - kd_weight`` goes to cross-entropy on the realized tokens. 0: CE-only baseline."""
    divergence: str = "forward_kl"
    """KD divergence: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd or akl (adaptive KL:
    forward and reverse KL mixed per token by where the student is wrong, see ``akl_mu``)."""
    tail: str = "bucket"
    """Missing-tail treatment: ``bucket`` (an explicit outcome holds the mass outside the teacher's
    stored ids, on both sides, so the student also learns how much mass to leave outside them) or
    ``renormalize`` (the stored ids only: it never penalizes student mass outside them; see the
    results page)."""
    temperature: float = 1.0
    """Distillation temperature (loss scaled by T^2)."""
    beta: float = 0.5
    """JSD beta (``jsd`` only)."""
    alpha: float = 0.1
    """Skew alpha (``skew_kl`` / ``skew_reverse_kl`` only)."""
    akl_mu: float = 0.5
    """AKL head threshold (``akl`` only; Wu et al., COLING 2025, who use 0.5): per token, the teacher's
    top outcomes up to this cumulative probability are the head, the rest (and the tail bucket) the
    tail; forward KL gets the head's share of |p - q|, reverse KL the tail's. Lower it to weigh
    reverse KL more. ``akl`` is for runs too short for forward or reverse KL alone to fit both the
    head (forward KL's strength early on) and the tail (reverse KL's), as in the paper's
    instruction-tuning students. ``benchmarks/adaptive.py`` compares it with ``forward_kl``."""
    cross_tokenizer_loss: str = "span_kl"
    """KD term for a student with its own tokenizer (``student.tokenizer``), at the positions
    where both tokenizations start the next token at the same byte: ``span_kl`` (forward KL over
    the teacher's top-k tokens that the student's vocabulary holds byte for byte, the rest as one
    bucket; GOLD's exact-match part) or ``uld`` (Universal Logit Distillation, Boizard et al.,
    2024: L1 between the sorted probability vectors; needs no shared tokens at all, for
    vocabularies that share almost nothing). ``benchmarks/cross_tokenizer.py`` compares them."""
    feature_weight: float = 0.0
    """Weight of the feature term (added to the KD + CE mix): the student's hidden states at
    ``student.feature_layers``, through a learned linear map each, against the teacher's stored
    features (``teacher.features``). 0: no feature term. The maps are trained, checkpointed and
    resumed with the student, saved beside it (``feature_heads.safetensors``) and left out of the
    exported model. The CE-only baseline never uses it."""
    feature_loss: str = "mse"
    """Feature term per position, averaged over the mapped layers: ``mse`` (the squared error over the
    teacher feature's mean square, so layers of any scale weigh alike: 1.0 for a map that outputs
    zeros) or ``cosine`` (1 - cosine similarity)."""
    seed: int = 0
    """Seeds data order and any randomness of training."""
    shuffle: bool = True
    """Shuffle the data each epoch (seeded): the order of row groups, then rows across ``shuffle_buffer``."""
    shuffle_buffer: int = 4096
    """Windows mixed at once. Shards keep a document's windows together (64 per row group), so
    without mixing a batch holds consecutive windows of one or two documents. The stream reads
    this many windows' row groups (from every shard, in a random order) and yields their rows
    shuffled, so a batch of 8 draws from ~8 documents. Memory: the buffer stays encoded, about
    the shard's bytes per labelled token (~63 at k=32) x window x buffer: ~33 MB at window 128,
    ~530 MB at window 2048; lower it for very long windows. Resume stays exact. 0: one row group."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only the final model)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept on disk."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``."""
    num_threads: int | None = None
    """CPU threads for torch (None: torch's default)."""
    progress: bool = True
    """Show a progress bar."""
    nproc_per_node: int = 1
    """Training processes on this machine (one per GPU). 1: train inside the calling process (the
    Dagster step); more: the asset starts ``torchrun`` through Dagster Pipes and streams its logs
    and metrics into the run. Changes the result (each rank reads its own share of the data), so
    it is part of the student's cache key, and a checkpoint resumes only with the same world size."""
    nnodes: int = 1
    """Machines training together. Above 1, every other node runs ``python -m distill.run.launch
    <student folder>/launch.json`` (the asset logs the exact command) and they meet at ``rdzv_endpoint``."""
    rdzv_endpoint: str | None = None
    """``host:port`` of the c10d rendezvous (a port on the first node), required when ``nnodes > 1``."""
    strategy: str = "ddp"
    """With more than one process: ``ddp`` (every rank holds the whole model; gradients all-reduced)
    or ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer plus the root: parameters, gradients and
    optimizer state sharded across ranks, for students that do not fit one device; distributed
    checkpoints, a full ``save_pretrained`` at the end). Ignored with one process."""

    def __post_init__(self):
        check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "a positive number")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        check(0 <= self.kd_weight <= 1, "kd_weight", self.kd_weight, "a number in [0, 1]")
        check(self.divergence in DIVERGENCES, "divergence", self.divergence, f"one of {sorted(DIVERGENCES)}")
        check(self.tail in TAILS, "tail", self.tail, f"one of {TAILS}")
        check(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check(
            self.tail != "bucket" or self.temperature == 1.0,
            "temperature",
            self.temperature,
            "1.0 when tail is 'bucket'",
        )
        check(0 < self.beta < 1, "beta", self.beta, "a number in (0, 1)")
        check(0 <= self.alpha < 1, "alpha", self.alpha, "a number in [0, 1)")
        check(0 < self.akl_mu < 1, "akl_mu", self.akl_mu, "a number in (0, 1)")
        check(self.precision in ("auto", "fp32", "bf16"), "precision", self.precision, "auto, fp32 or bf16")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "an integer >= 0")
        check(self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, "an integer >= 0 (windows)")
        check(self.nproc_per_node >= 1, "nproc_per_node", self.nproc_per_node, "an integer >= 1")
        check(self.nnodes >= 1, "nnodes", self.nnodes, "an integer >= 1")
        check(
            self.nnodes == 1 or bool(self.rdzv_endpoint and ":" in self.rdzv_endpoint),
            "rdzv_endpoint",
            self.rdzv_endpoint,
            "host:port of the rendezvous (needed when nnodes > 1)",
        )
        check(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {STRATEGIES}")
        check(self.feature_weight >= 0, "feature_weight", self.feature_weight, "a number >= 0")
        check(self.feature_loss in FEATURE_LOSSES, "feature_loss", self.feature_loss, " or ".join(FEATURE_LOSSES))
        check(
            self.cross_tokenizer_loss in CROSS_TOKENIZER_LOSSES,
            "cross_tokenizer_loss",
            self.cross_tokenizer_loss,
            f"one of {CROSS_TOKENIZER_LOSSES}",
        )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def effective_warmup(self) -> int:
        return self.warmup_steps or max(1, self.steps // 20)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
        warm = self.effective_warmup
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
