"""The run config: one YAML file holding one section per stage, each validated into that
stage's dataclass with errors that name the field.

Every rule that relates fields of different sections lives here: ``RunConfig.__post_init__``
checks those the config alone decides (at load), ``check_against_teacher`` those that need the
teacher's files (called by the run layer once the teacher is resolved). Loading a config imports
neither torch nor vLLM nor transformers, so a config error comes back at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from distill.configbase import ConfigError, build
from distill.data import CorpusConfig, load_mc
from distill.eval.config import EvalConfig
from distill.run.config import OnPolicyConfig
from distill.teacher.config import TeacherConfig
from distill.train.config import StudentConfig, TrainConfig
from storage.kinds import KINDS

SECTIONS = ("storage_root", "labels_uri", "teacher", "corpus", "student", "train", "eval", "onpolicy")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    storage_root: str = "data"
    """Folder for converted teachers, corpora, label shards, students and reports (relative paths
    are relative to the config file's project, i.e. the working directory)."""
    labels_uri: str | None = None
    """Where label shards live: a local folder or an object-store URI (``s3://bucket/prefix``);
    default ``<storage_root>/labels``. Image questions' images go beside them, ``<labels_uri>/images``."""
    teacher: TeacherConfig = TeacherConfig()
    corpus: CorpusConfig = CorpusConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    onpolicy: OnPolicyConfig = OnPolicyConfig()
    """On-policy (GKD) rounds after the distilled student (``distill.run.onpolicy``; ``rounds: 0``: none)."""

    def __post_init__(self):
        # every rule that relates fields of different sections; those that need the teacher's
        # files are in ``check_against_teacher``
        self._check_onpolicy()
        self._check_label_kind()
        self._check_student_tokenizer()
        self._check_features()
        self._check_images()

    def _check_images(self) -> None:
        """A vision teacher reads images; image questions go through one teacher, the teacher's
        tokens, and score or generate mode."""
        if self.teacher.vision is not None and not self.corpus.images:
            raise ConfigError(
                "teacher.vision builds a vision-language teacher: set corpus.image_column (or corpus.source: "
                "synthetic_shapes) so the corpus has images"
            )
        if not self.corpus.images:
            return
        for ok, field, what in (
            (self.teacher.mode != "candidates", "teacher.mode", "score or generate mode"),
            (not self.teacher.ensemble, "teacher.models", "one teacher (model), not an ensemble"),
            (self.teacher.features is None, "teacher.features", "no teacher.features"),
            (self.student.tokenizer is None, "student.tokenizer", "a student with the teacher's tokenizer"),
            (self.onpolicy.rounds == 0, "onpolicy.rounds", "no on-policy rounds"),
        ):
            if not ok:
                raise ConfigError(f"corpus.image_column (image questions) needs {what}: change {field}")

    def _check_features(self) -> None:
        """Feature distillation needs captured features, and each mapped teacher layer captured."""
        features = self.teacher.features
        if self.train.feature_weight > 0 and features is None:
            raise ConfigError(
                f"train.feature_weight={self.train.feature_weight} needs teacher.features (the layers to capture)"
            )
        if self.student.feature_layers and features is None:
            raise ConfigError("student.feature_layers needs teacher.features (the layers to capture)")
        if features is None:
            return
        for student_layer, teacher_layer in self.student.feature_layers:
            if teacher_layer not in features.layers:
                raise ConfigError(
                    f"student.feature_layers: [{student_layer}, {teacher_layer}] maps teacher layer {teacher_layer}, "
                    f"which teacher.features.layers={list(features.layers)} does not capture"
                )
        for ok, field, what in (
            (self.student.tokenizer is None, "student.tokenizer", "a student with the teacher's tokenizer"),
            (not self.onpolicy.rounds, "onpolicy.rounds", "no on-policy rounds (their answers carry no features)"),
        ):
            if not ok:
                raise ConfigError(f"teacher.features needs {what}: unset {field}")

    def _check_onpolicy(self) -> None:
        if not self.onpolicy.rounds:
            return
        needs = [
            (
                self.teacher.mode == "generate",
                f"teacher.mode: generate (prompts to answer), not {self.teacher.mode!r}",
            ),
            (
                self.teacher.labels == "topk",
                "teacher.labels: topk (the round's answers are labelled top-k and mixed with the train shards)",
            ),
            (
                self.student.tokenizer is None,
                "a student that shares the teacher's tokenizer (the teacher scores the student's tokens)",
            ),
        ]
        for ok, what in needs:
            if not ok:
                raise ConfigError(f"onpolicy.rounds={self.onpolicy.rounds} needs {what}")

    def _check_student_tokenizer(self) -> None:
        """A student with its own tokenizer learns from the teacher's per-token distributions over
        a text, aligned by bytes: only ``score`` labels are that."""
        if self.student.tokenizer is not None and self.teacher.mode != "score":
            raise ConfigError(
                f"student.tokenizer={self.student.tokenizer!r} needs teacher.mode: score (labels of a text to align "
                f"by bytes), not {self.teacher.mode!r}"
            )

    def _check_label_kind(self) -> None:
        """The train shards' label kind says which losses its targets are faithful for
        (``storage.kinds``, each kind's ``rules`` and why): refuse the others here."""
        if self.train.kd_weight == 0:
            return
        kind = self.teacher.label_kind("train")["kind"]
        rules = KINDS[kind].rules
        refused = rules.refusals(
            self.train.divergence, self.train.tail, self.train.temperature, self.student.tokenizer is not None
        )
        fields = {
            "divergence": ("train.divergence", self.train.divergence),
            "tail": ("train.tail", self.train.tail),
            "temperature": ("train.temperature", self.train.temperature),
            "tokenizer": ("student.tokenizer", self.student.tokenizer),
        }
        if refused:
            setting, accepted = refused[0]
            field, value = fields[setting]
            raise ConfigError(
                f"{kind} labels (teacher.mode: {self.teacher.mode}, teacher.labels: {self.teacher.labels}) with "
                f"{field}={value!r} are refused: expected {accepted}; {rules.why}; or set train.kd_weight: 0"
            )

    @property
    def root(self) -> Path:
        return Path(self.storage_root).expanduser().resolve()

    @property
    def baseline_train(self) -> TrainConfig:
        """The CE-only baseline: same everything, KD and feature weights 0."""
        return dataclasses.replace(self.train, kd_weight=0.0, feature_weight=0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_mapping(data: Mapping[str, Any] | None, where: str = "config") -> RunConfig:
    data = dict(data or {})
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; accepted: {list(SECTIONS)}")
    root = data.get("storage_root", "data")
    if not isinstance(root, str):
        raise ConfigError(f"{where}: storage_root={root!r} is invalid: expected a path string")
    labels_uri = data.get("labels_uri")
    if labels_uri is not None and not isinstance(labels_uri, str):
        raise ConfigError(f"{where}: labels_uri={labels_uri!r} is invalid: expected a path or URI string")
    teacher = data.get("teacher")
    if isinstance(teacher, Mapping) and teacher.get("models") and "model" in teacher:
        raise ConfigError(f"{where}: teacher: give model (one teacher) or models (an ensemble), not both")
    return RunConfig(
        storage_root=root,
        labels_uri=labels_uri,
        teacher=build(TeacherConfig, data.get("teacher"), f"{where}: teacher"),
        corpus=build(CorpusConfig, data.get("corpus"), f"{where}: corpus"),
        student=build(StudentConfig, data.get("student"), f"{where}: student"),
        train=build(TrainConfig, data.get("train"), f"{where}: train"),
        eval=build(EvalConfig, data.get("eval"), f"{where}: eval"),
        onpolicy=build(OnPolicyConfig, data.get("onpolicy"), f"{where}: onpolicy"),
    )


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Deep-merge ``overrides`` into ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The run config from a YAML file, with optional overrides (from the launchpad)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    where = f"{path} + overrides" if overrides else str(path)
    cfg = from_mapping(merge(data or {}, overrides) if overrides else data, where=where)
    check_mc_file(cfg.eval.mc_file, where)
    return cfg


def check_mc_file(mc_file: str | None, where: str) -> None:
    """Read the multiple-choice file now, so a bad line fails at load time, not after training.

    Relative paths are relative to the working directory, as evaluation reads them.
    """
    if not mc_file:
        return
    if not Path(mc_file).is_file():
        raise ConfigError(
            f"{where}: eval.mc_file={mc_file!r}: no such file (relative paths are relative to the working "
            f"directory, {Path.cwd()})"
        )
    try:
        load_mc(mc_file)
    except ValueError as e:
        raise ConfigError(f"{where}: eval.mc_file: {e}") from None


def check_against_teacher(
    cfg: RunConfig, teacher_config: Mapping[str, Any], member_tokenizers: Sequence[tuple[str, str]] = ()
) -> None:
    """The rules that need the teacher's files, checked by the run layer once the teacher is
    resolved: ``teacher_config`` is its model config (``config.json`` as a mapping);
    ``member_tokenizers`` the (folder, tokenizer content hash) of each ``teacher.models`` member,
    in order (empty for one teacher)."""
    model = teacher_config.get("text_config") or teacher_config  # a multimodal checkpoint nests its LM's
    context = model.get("max_position_embeddings")
    if context is not None and cfg.corpus.window > context:
        raise ConfigError(
            f"corpus.window={cfg.corpus.window} exceeds the teacher's context ({context} positions: "
            "max_position_embeddings in its config.json)"
        )
    vocab = model.get("vocab_size")
    if vocab is not None and cfg.teacher.k > vocab:
        raise ConfigError(f"teacher.k={cfg.teacher.k} exceeds the teacher's vocabulary ({vocab} tokens)")
    features = cfg.teacher.features
    if features is not None:
        layers, hidden = model.get("num_hidden_layers"), model.get("hidden_size")
        beyond = [x for x in features.layers if layers is not None and x > layers]
        if beyond:
            raise ConfigError(
                f"teacher.features.layers={list(features.layers)}: the teacher has {layers} layers (0: the embeddings, "
                f"{layers}: the last one's output), not {beyond[0]}"
            )
        if hidden is not None and features.dim > hidden:
            raise ConfigError(f"teacher.features.dim={features.dim} exceeds the teacher's hidden size ({hidden})")
    check_member_tokenizers(cfg, member_tokenizers)


def check_member_tokenizers(cfg: RunConfig, member_tokenizers: Sequence[tuple[str, str]]) -> None:
    """An ensemble mixes its members' distributions over the same token ids: every member's
    tokenizer (``(folder, content hash)`` per ``teacher.models`` member, in order) is the first's."""
    if not member_tokenizers:
        return
    first_folder, first_hash = member_tokenizers[0]
    for i, (folder, tokenizer_hash) in enumerate(member_tokenizers):
        if tokenizer_hash != first_hash:
            model = cfg.teacher.members[i].model if i < len(cfg.teacher.members) else folder
            raise ConfigError(
                f"teacher.models[{i}].model={model!r} ({folder}) does not share the first member's tokenizer "
                f"({first_folder}); an ensemble mixes distributions over the same token ids"
            )
