"""The process's teacher engines: one vLLM engine per teacher and settings, started on first use
and kept for the process's later stages (a start costs tens of seconds), started anew when the
one held has died or failed (the out-of-memory killer takes engines)."""

from __future__ import annotations

import dataclasses
import json

from distill.config import RunConfig
from distill.run.paths import teacher_dir
from distill.teacher.config import TeacherConfig
from distill.teacher.slots import slot_dir
from distill.teacher.vllm_engine import VllmTeacher, on_cpu

_ENGINES: dict[tuple, VllmTeacher] = {}


def _key(cfg: RunConfig, generates: bool) -> tuple[tuple, TeacherConfig, dict]:
    """The registry key of ``get_engine(cfg, generates)``'s engine, its teacher settings and the
    features it captures."""
    labeller = "logprobs" if generates else cfg.teacher.labeller
    teacher = dataclasses.replace(cfg.teacher, engine=dataclasses.replace(cfg.teacher.engine, labeller=labeller))
    features = teacher.feature_params if labeller == "device" else {}  # captured by the device labeller
    # the same key for a generating engine of a score-mode config and a generate-mode config's engine
    key = (
        str(teacher_dir(cfg)),
        cfg.teacher.k,
        cfg.corpus.window,
        teacher.engine,
        teacher.max_logprobs,
        json.dumps(features, sort_keys=True),
    )
    return key, teacher, features


def get_engine(cfg: RunConfig, generates: bool = False) -> VllmTeacher:
    """The process's engine for this teacher and settings, started on first use, and started
    anew when the one held has died or failed. ``generates``: an engine that can generate (greedy
    answers), which a ``device`` labeller's pooling engine cannot: such calls get a ``logprobs`` one."""
    key, teacher, features = _key(cfg, generates)
    engine_cfg, max_logprobs = teacher.engine, teacher.max_logprobs
    held = _ENGINES.get(key)
    if held is not None and not held.alive():
        _ENGINES.pop(key).close()
    if key not in _ENGINES:
        if _ENGINES and not on_cpu():
            # a GPU engine claims its share of the device's memory when it starts: a second engine of the
            # same teacher (a generating one beside a device labeller) would not fit beside the first
            for other in [k for k in _ENGINES if k[0] == key[0]]:
                _ENGINES.pop(other).close()
        _ENGINES[key] = VllmTeacher(
            teacher_dir(cfg),
            cfg.teacher.k,
            cfg.corpus.window,
            engine_cfg,
            slot_folder=slot_dir(cfg.root),
            max_logprobs=max_logprobs,
            features=features,
        )
    return _ENGINES[key]


def close_engine_of(cfg: RunConfig, generates: bool = False) -> None:
    """Close the one engine ``get_engine(cfg, generates)`` returns, if it is running (others stay)."""
    key = _key(cfg, generates)[0]
    if key in _ENGINES:
        _ENGINES.pop(key).close()


def close_engine(cfg: RunConfig) -> None:
    """Close this run's teacher engine, if it is running (others stay)."""
    for key in [key for key in _ENGINES if key[0] == str(teacher_dir(cfg))]:
        _ENGINES.pop(key).close()


def close_engines() -> None:
    """Close every engine this process holds (at exit, or to free the device)."""
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.close()


def engine_name() -> str:
    """The labelling engine and its version, as shard metadata records it."""
    # lazy: vLLM is an optional extra (cpu or gpu) and costs seconds to import
    import vllm

    return f"vllm-{vllm.__version__}"
