"""The vLLM teacher engine: teacher-forced soft labels, with one of two labellers
(``EngineConfig.labeller``).

``device``: the engine runs the teacher as a pooling model registered by our vLLM plugin
(``distill.teacher.vllm_labeller``), whose pooler computes every position's labels from the
full-vocabulary logits on the engine's device and returns one packed tensor per window. Such an
engine scores (labels, sequence logprobs, candidates) but cannot generate.

``logprobs``: token-id prompts, ``prompt_logprobs=k`` with flat logprobs and no detokenization, prefix caching
off (it would skip the prompt positions whose logprobs we need), one engine per process reused
across shards. vLLM returns, for each prompt position ``p >= 1``, the realized token ``p`` first
(with its true rank) followed by ranks ``1..k``; the realized token is therefore *not* counted
twice here: the top-k are always entries ``1..k``.

Every engine call is supervised (``VllmTeacher._generate``): vLLM waits for ever when its
``EngineCore`` process is killed (the out-of-memory killer's usual pick) or stopped, so the call
runs in a helper thread while this one watches the engine's processes and its progress; a dead
process fails the call at once, a call with no finished engine step for
``EngineConfig.step_timeout_s`` fails it then, both with an ``EngineFailure`` that names the
process, how it ended and what to try. The failed engine is ended and its slot freed, so a retry
(the ``teacher_logits`` step's) starts a fresh one and relabels only the shards not yet committed.

vLLM is imported inside the methods that use it, the one lazy import of the teacher room: vLLM is an
optional extra of a training-only install (``cpu``/``gpu``), and its import takes seconds and sets up
threads that a process that only reads shards should not pay for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import psutil

from distill.procs import descendants_alive, end_processes, guard_children, is_resource_tracker
from distill.teacher import vllm_labeller
from distill.teacher.config import EngineConfig
from distill.teacher.slots import claim_slot, device_sets, pinned
from distill.vision import engine_prompt


class EngineFailure(RuntimeError):
    """The teacher engine died or stalled during a call; the message names the process, how it
    ended and what to try. The engine is closed (its processes ended, its slot freed)."""


POLL_S = 0.5  # how often a running call checks the engine's processes
ADVICE = (
    "Labels committed so far are kept: a retry (the teacher_logits asset retries its step twice after an "
    "engine failure) starts a fresh engine and labels only the missing shards. If memory ran out, try fewer "
    "engines at once (teacher.engine.slots, other runs or jobs on this machine), a smaller "
    "teacher.engine.batch_windows or max_num_batched_tokens, a smaller KV cache "
    "(teacher.engine.cpu_kv_cache_gib on a CPU, gpu_memory_utilization on a GPU), or a machine with more memory."
)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _cpu_env(cfg: EngineConfig) -> None:
    """Use every core this process may run on, unless the user chose otherwise."""
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault(
        "VLLM_CPU_OMP_THREADS_BIND",
        f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores)),
    )
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))


class VllmTeacher:
    """One vLLM engine over a local checkpoint, producing top-k labels for token windows."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        k: int,
        max_len: int,
        cfg: EngineConfig = EngineConfig(),
        slot_folder: str | os.PathLike | None = None,
        max_logprobs: int | None = None,
        features: dict | None = None,
    ):
        """``k``: logprobs per position by default; ``max_logprobs`` (default ``k``): the most a
        call may ask for (sampled labels read a larger top-K'); ``slot_folder``: where this
        machine's engine slots are claimed (``cfg.slots`` > 0); ``features``: the teacher features
        this engine captures (``ShardMeta.features``: ``layers``, ``dim``, ``seed``; device labeller only)."""
        import vllm  # lazy: see the module docstring

        guard_children()  # the engine's processes end with this one, however it ends
        self.cfg, self.k, self.max_len = cfg, k, max_len
        self.labeller = cfg.labeller
        self.features = dict(features or {})
        if self.features and self.labeller != "device":
            raise ValueError("teacher features are captured by the device labeller (teacher.engine.labeller: device)")
        self.max_logprobs = max(k, max_logprobs or k)
        self.slot, pin = None, contextlib.nullcontext()
        if cfg.slots:
            if slot_folder is None:
                raise ValueError("teacher.engine.slots is set but no slot folder was given")
            on_gpu = not on_cpu()
            self.slot = claim_slot(
                Path(slot_folder),
                device_sets(cfg.slots, cfg.tensor_parallel_size, on_gpu),
                on_wait=lambda msg: print(msg, file=sys.stderr, flush=True),
            )
            pin = pinned(self.slot.devices, on_gpu)
        before = {c.pid for c in psutil.Process().children(recursive=True)}
        self.model_dir = Path(model_dir)
        dtype = cfg.dtype
        if on_cpu():
            _cpu_env(cfg)
            if dtype == "auto":
                dtype = "float32"
        self.dtype = dtype
        self.engine_version = f"vllm-{vllm.__version__}"
        try:
            with pin:
                self.llm = self._start(vllm, dtype)
        except BaseException:
            if self.slot is not None:
                self.slot.release()
            raise
        # the engine's own processes; multiprocessing's resource tracker is shared and ends by itself
        self.processes = [
            c for c in psutil.Process().children(recursive=True) if c.pid not in before and not is_resource_tracker(c)
        ]
        if self.slot is not None:
            self.slot.record_engine(self.processes)
        self.titles = {p.pid: _title(p) for p in self.processes}
        # vLLM titles its long-lived processes ``VLLM::EngineCore``, ``VLLM::Worker``...: those must
        # live as long as the engine; a helper that ends by itself is not a dead engine
        self.watched = [p for p in self.processes if "::" in self.titles[p.pid]] or list(self.processes)
        self.failure: str | None = None
        self._last_step = [time.monotonic()]  # when the engine last finished a scheduler step
        _count_steps(self.llm, self._last_step)
        self.params = vllm.SamplingParams(
            max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True, temperature=0.0
        )
        self.forward_calls = 0
        self.engine_seconds = 0.0  # wall time inside engine calls (the rest of a labelling run is host work)

    def _device_settings(self) -> dict:
        """The engine arguments that run the teacher as the device labeller's pooling model."""
        from importlib.metadata import entry_points

        if not any(e.value.startswith(vllm_labeller.__name__) for e in entry_points(group="vllm.general_plugins")):
            raise RuntimeError(
                "teacher.engine.labeller: device needs this project installed as a package (pip install -e .), "
                "so that vLLM loads its plugin (entry point group vllm.general_plugins) in the engine's processes; "
                "a stale offline_distill.egg-info folder on sys.path can hide it. Or set teacher.engine.labeller: "
                "logprobs"
            )
        archs = json.loads((self.model_dir / "config.json").read_text()).get("architectures") or []
        if not archs:
            raise ValueError(f"{self.model_dir / 'config.json'}: no 'architectures' to label with")
        known = {a for a in os.environ.get(vllm_labeller.ENV, "").split(",") if a}
        # read by the plugin in every engine process
        os.environ[vllm_labeller.ENV] = ",".join(sorted(known | set(archs)))
        # and registered here too: vLLM checks the architecture in this process, where it loads plugins
        # once, so an engine of another architecture started earlier left only that one registered
        vllm_labeller.register()
        overrides = {"architectures": [vllm_labeller.labeller_arch(a) for a in archs]}
        if self.features:
            overrides[vllm_labeller.FEATURES_KEY] = {n: self.features[n] for n in ("layers", "dim", "seed")}
        return {"runner": "pooling", "hf_overrides": overrides}

    def _start(self, vllm, dtype: str):
        cfg, max_len = self.cfg, self.max_len
        labeller = self._device_settings() if self.labeller == "device" else {}
        # on the CPU a prompt split across scheduler steps (chunked prefill) kills the engine when
        # its request is seeded: vLLM rewinds the request's generator offset, which CPU generators
        # do not have ("CPU Generator does not use offset"); answering many or long prompts with
        # per-prompt seeds (generate mode, on-policy rounds) hits it, so prompts go in whole there
        chunked = {} if not on_cpu() else {"enable_chunked_prefill": False}
        return vllm.LLM(
            model=str(self.model_dir),
            dtype=dtype,
            max_model_len=max_len + 1,  # the one generated token vLLM insists on
            max_logprobs=self.max_logprobs,
            enable_prefix_caching=False,
            logprobs_mode="raw_logprobs",  # labels are the model's own distribution, before temperature / top-p
            enforce_eager=cfg.enforce_eager,
            max_num_batched_tokens=max(cfg.max_num_batched_tokens, max_len + 1),
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            trust_remote_code=cfg.trust_remote_code,
            seed=cfg.seed,
            **chunked,
            **labeller,
        )

    def _check_k(self, k: int | None) -> int:
        k = k or self.k
        if k > self.max_logprobs:
            raise ValueError(f"{k} logprobs per position asked of an engine started for at most {self.max_logprobs}")
        return k

    def score(
        self,
        windows: Sequence[Sequence[int]],
        label_starts: Sequence[int],
        k: int | None = None,
        draws: int = 0,
        seeds: Sequence[int] | None = None,
        features: bool = False,
        images: Sequence | None = None,
    ) -> Iterator[dict]:
        """Per window, the labels of positions ``label_start .. len - 2`` (see ``flat_to_labels``),
        ``k`` (default: the engine's) logprobs per position; with ``draws`` (device labeller only),
        ``draw_ids``/``draw_counts`` too, each window's draws seeded by its entry of ``seeds``; with
        ``features`` (an engine started with them), ``feature_scales`` (n, layers) and
        ``feature_codes`` (n, layers, dim), the teacher features of the same positions. ``images``:
        one PIL image per window, for a vision-language teacher (the windows hold its image tokens)."""
        if features and not self.features:
            raise ValueError("teacher features asked of an engine started without them (teacher.features)")
        if self.labeller == "device":
            k = k or self.k
            shape = (len(self.features["layers"]), int(self.features["dim"])) if features else None
            for ids, i, packed in self._device_labels(windows, k, draws, seeds, shape, images):
                yield vllm_labeller.unpack(packed[int(label_starts[i]) : len(ids) - 1], k, draws, shape)
            return
        if draws:
            raise ValueError("draws are made by the device labeller (teacher.engine.labeller: device)")
        import vllm

        k = self._check_k(k)
        params = (
            self.params
            if k == self.k
            else vllm.SamplingParams(
                max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True, temperature=0.0
            )
        )
        for b in range(0, len(windows), self.cfg.batch_windows):
            batch = windows[b : b + self.cfg.batch_windows]
            for ids in batch:
                if len(ids) > self.max_len:
                    raise ValueError(f"window of {len(ids)} tokens exceeds the engine's max_len {self.max_len}")
            outputs = self._generate(_prompts(batch, images, b), params)
            self.forward_calls += 1
            for ids, start, out in zip(batch, label_starts[b : b + len(batch)], outputs):
                yield flat_to_labels(out.prompt_logprobs, np.asarray(ids), int(start), k)

    def _device_labels(
        self,
        windows: Sequence[Sequence[int]],
        k: int,
        draws: int = 0,
        seeds: Sequence[int] | None = None,
        features: tuple[int, int] | None = None,
        images: Sequence | None = None,
    ) -> Iterator[tuple[Sequence[int], int, np.ndarray]]:
        """(window, its index, packed labels of every position (len, width)) from the device labeller;
        ``features``: (layers, dim) of the features to pack after the labels."""
        from vllm import PoolingParams

        if draws and (seeds is None or len(seeds) != len(windows)):
            raise ValueError("draws need one seed per window")
        for b in range(0, len(windows), self.cfg.batch_windows):
            batch = windows[b : b + self.cfg.batch_windows]
            for ids in batch:
                if len(ids) > self.max_len:
                    raise ValueError(f"window of {len(ids)} tokens exceeds the engine's max_len {self.max_len}")
            params = [
                PoolingParams(
                    extra_kwargs={
                        "k": k,
                        "draws": draws,
                        "seed": int(seeds[b + i]) if draws else 0,
                        "features": int(features is not None),
                    }
                )
                for i in range(len(batch))
            ]
            outputs = self._generate(_prompts(batch, images, b), params, "encode")
            self.forward_calls += 1
            for i, (ids, out) in enumerate(zip(batch, outputs)):
                packed = out.outputs.data.numpy()
                expected = (len(ids), vllm_labeller.width(k, draws, features))
                if packed.shape != expected:
                    raise RuntimeError(
                        f"device labels of shape {packed.shape} for a window of {len(ids)} tokens (expected {expected})"
                    )
                yield ids, b + i, packed

    def _refuse_generation(self, what: str) -> None:
        if self.labeller == "device":
            raise RuntimeError(
                f"{what} needs a generating engine; this one was started with teacher.engine.labeller: device "
                "(a pooling model that only scores): get one with distill.run.engines.get_engine(cfg, generates=True)"
            )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        sampling,
        k: int | None = None,
        images: Sequence | None = None,
    ) -> Iterator[list[dict]]:
        """Per prompt, ``sampling.n`` teacher answers with top-k labels for every generated token.

        ``sampling``: ``n``, ``temperature``, ``top_p``, ``max_tokens`` (capped so prompt + answer
        fit ``max_len``). ``seeds``: one per prompt, so an answer does not depend on which other
        prompts share its batch. Labels are the raw (temperature 1) distributions the sampler
        started from: vLLM's ``raw_logprobs`` mode, recorded as temperature 1.0 in the shard.
        """
        self._refuse_generation("generate")
        import vllm

        k = self._check_k(k)
        for out in self._answers(
            prompts,
            seeds,
            lambda room, seed: vllm.SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=min(sampling.max_tokens, room),
                logprobs=k,
                flat_logprobs=True,
                seed=int(seed),
            ),
            images,
        ):
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = np.asarray(c.token_ids, np.int64)
                samples.append(
                    {
                        "response_ids": ids,
                        "text": c.text,
                        "finish_reason": str(c.finish_reason),
                        **_flat_positions(c.logprobs, 0, ids, k),
                    }
                )
            yield samples

    def _answers(
        self, prompts: Sequence[Sequence[int]], per_prompt: Sequence, make_params, images: Sequence | None = None
    ) -> Iterator:
        """vLLM outputs of answering ``prompts`` (with ``images``: one PIL image each) in
        macro-batches; ``make_params(room, item)`` builds a prompt's sampling parameters from the
        tokens left within ``max_len`` and its item of ``per_prompt``. A prompt that leaves no room raises."""
        for b in range(0, len(prompts), self.cfg.batch_windows):
            batch = prompts[b : b + self.cfg.batch_windows]
            params = []
            for ids, item in zip(batch, per_prompt[b : b + len(batch)]):
                room = self.max_len - len(ids)
                if room < 1:
                    raise ValueError(
                        f"prompt of {len(ids)} tokens leaves no room to answer within the engine's max_len "
                        f"{self.max_len}"
                    )
                params.append(make_params(room, item))
            outputs = self._generate(_prompts(batch, images, b), params)
            self.forward_calls += 1
            yield from outputs

    def score_candidates(
        self, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]]
    ) -> Iterator[np.ndarray]:
        """Per example, the summed logprob of each candidate's tokens following its prompt
        and the token counts: an array of shape (2, C)."""
        for b in range(0, len(prompts), self.cfg.batch_windows):
            seqs, starts, owners = [], [], []
            for i in range(b, min(b + self.cfg.batch_windows, len(prompts))):
                for cand in candidates[i]:
                    seq = [int(t) for t in prompts[i]] + [int(t) for t in cand]
                    if len(seq) > self.max_len:
                        raise ValueError(
                            f"prompt + candidate of {len(seq)} tokens exceeds the engine's max_len {self.max_len}"
                        )
                    seqs.append(seq)
                    starts.append(len(prompts[i]))
                    owners.append(i)
            scores: dict[int, list] = {}
            for owner, row in zip(owners, self.sequence_logprobs(seqs, starts)):
                scores.setdefault(owner, []).append(row)
            for i in sorted(scores):
                yield np.asarray(scores[i], np.float64).T

    def greedy(
        self, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int], eos_token_id: int | None
    ) -> list[list[int]]:
        """Each prompt's greedy (temperature 0) continuation, up to and excluding ``eos_token_id``
        (the only stop token, as in ``distill.eval.answers.greedy_answers``), at most ``max_tokens``
        tokens (one number, or one per prompt). A prompt that leaves no room within ``max_len``
        raises; a longer answer than the room left is cut there."""
        self._refuse_generation("greedy answers")
        import vllm

        limits = [int(max_tokens)] * len(prompts) if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
        if len(limits) != len(prompts):
            raise ValueError(f"{len(limits)} max_tokens values for {len(prompts)} prompts")
        answers: list[list[int]] = []
        for out in self._answers(
            prompts,
            limits,
            lambda room, limit: vllm.SamplingParams(
                temperature=0.0,
                max_tokens=min(limit, room),
                detokenize=False,
                ignore_eos=True,
                stop_token_ids=[int(eos_token_id)] if eos_token_id is not None else None,
            ),
        ):
            answer = [int(t) for t in out.outputs[0].token_ids]
            if eos_token_id is not None and eos_token_id in answer:
                answer = answer[: answer.index(eos_token_id)]
            answers.append(answer)
        return answers

    def sequence_logprobs(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], greedy: bool = False
    ) -> np.ndarray:
        """Per sequence, the summed logprob of its tokens ``start ..`` given everything before
        them, and their count: an array of shape (N, 2) (float64); with ``greedy``, a third
        column: 1.0 where every one of those tokens was the engine's most likely (rank 1). A
        sequence longer than ``max_len`` raises, naming its index."""
        import vllm

        if len(sequences) != len(starts):
            raise ValueError(f"{len(starts)} start offsets for {len(sequences)} sequences")
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            if len(seq) > self.max_len:
                raise ValueError(f"sequence {i} of {len(seq)} tokens exceeds the engine's max_len {self.max_len}")
            if not 1 <= start < len(seq):
                raise ValueError(
                    f"sequence {i}: start {start} must be in 1..{len(seq) - 1} "
                    "(at least one scored token after a prefix)"
                )
        out_rows = []
        if self.labeller == "device":  # the realized tokens' logprobs, and whether each was the top id
            for seq, i, packed in self._device_labels(sequences, 1):
                labels = vllm_labeller.unpack(packed[starts[i] - 1 : len(seq) - 1], 1, 0)
                row = (float(np.sum(labels["target_logprobs"], dtype=np.float64)), len(seq) - starts[i])
                if greedy:
                    row += (float(np.array_equal(labels["topk_ids"][:, 0], np.asarray(seq[starts[i] :]))),)
                out_rows.append(row)
            return np.asarray(out_rows, np.float64).reshape(-1, 3 if greedy else 2)
        params = vllm.SamplingParams(
            max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True, temperature=0.0
        )
        for b in range(0, len(sequences), self.cfg.batch_windows):
            seqs = [[int(t) for t in s] for s in sequences[b : b + self.cfg.batch_windows]]
            outputs = self._generate([{"prompt_token_ids": s} for s in seqs], params)
            self.forward_calls += 1
            for seq, start, out in zip(seqs, starts[b : b + len(seqs)], outputs):
                flat = out.prompt_logprobs
                lo, hi = flat.start_indices[start], flat.end_indices[len(seq) - 1]
                if hi - lo != len(seq) - start or list(flat.token_ids[lo:hi]) != seq[start:]:
                    raise RuntimeError("prompt logprobs are not aligned with the sequence's tokens")
                row = (float(np.sum(np.asarray(flat.logprobs[lo:hi], np.float64))), len(seq) - start)
                if greedy:
                    row += (float(all(r == 1 for r in flat.ranks[lo:hi])),)
                out_rows.append(row)
        return np.asarray(out_rows, np.float64).reshape(-1, 3 if greedy else 2)

    def alive(self) -> bool:
        """Whether the engine can still answer: not closed, not failed, and every process it
        started still running (the out-of-memory killer may have taken one between calls)."""
        return self.llm is not None and not self.failure and not self._dead_processes()

    def _generate(self, prompts: list, params, method: str = "generate") -> list:
        """``llm.generate`` (or ``llm.encode``, ``method``) under supervision: the call runs in a
        helper thread while this one checks, every ``POLL_S`` seconds, that the engine's processes
        live and that it finished a scheduler step within ``cfg.step_timeout_s``; otherwise the
        engine is ended and ``EngineFailure`` raised (vLLM alone would wait for ever on a killed or stopped core)."""
        if self.llm is None or self.failure:
            raise EngineFailure(f"the teacher engine is closed{': ' + self.failure if self.failure else ''}")
        dead = self._dead_processes()
        if dead:
            self._fail(self._death_message(dead, "between calls"))
        llm, outcome, done = self.llm, {}, threading.Event()

        def call():
            try:
                if method == "encode":
                    outcome["outputs"] = llm.encode(prompts, params, pooling_task="token_classify", use_tqdm=False)
                else:
                    outcome["outputs"] = llm.generate(prompts, params, use_tqdm=False)
            except BaseException as exc:  # handed to the supervising thread
                outcome["error"] = exc
            finally:
                done.set()

        self._last_step[0] = started = time.monotonic()
        threading.Thread(target=call, name="teacher-engine-call", daemon=True).start()
        while not done.wait(POLL_S):
            dead = self._dead_processes()
            if dead:
                self._fail(self._death_message(dead, "during a call"))
            stalled = time.monotonic() - self._last_step[0]
            if stalled > self.cfg.step_timeout_s:
                self._fail(self._stall_message(stalled))
        self.engine_seconds += time.monotonic() - started
        if "error" in outcome:
            error = outcome["error"]
            dead = self._dead_processes()
            if dead or _engine_dead(llm):
                self._fail(
                    self._death_message(dead, "during a call")
                    if dead
                    else f"the teacher engine reported itself dead ({type(error).__name__}: {error}). {ADVICE}",
                    error,
                )
            raise error
        return outcome["outputs"]

    def _dead_processes(self) -> list:
        procs = getattr(self, "watched", [])
        alive = {p.pid for p in descendants_alive(procs)}
        return [p for p in procs if p.pid not in alive]

    def _death_message(self, dead: list, when: str) -> str:
        parts = []
        for p in dead:
            status, oom = _exit_status(self.llm, p.pid), _oom_record(p.pid)
            if oom:
                how = f"was killed by the kernel's out-of-memory killer (kernel log: {oom})"
            elif status is not None and status < 0:
                how = f"was killed by {signal.Signals(-status).name}"
                if -status == signal.SIGKILL:
                    how += (
                        ", perhaps by the kernel's out-of-memory killer (the kernel log is not readable here to tell)"
                        if oom is None
                        else " (not by the kernel's out-of-memory killer: the kernel log has no record of it)"
                    )
            elif status is not None:
                how = f"exited with status {status}"
            else:
                how = "ended (its exit status is not visible to this process" + (
                    "; the kernel's out-of-memory killer may have taken it, the kernel log is not readable here)"
                    if oom is None
                    else "; the kernel log has no out-of-memory kill of it)"
                )
            parts.append(f"{self.titles.get(p.pid, 'engine process')} (pid {p.pid}) {how}")
        return (
            f"teacher engine process {'; '.join(parts)} {when}; the call failed instead of waiting for an "
            f"engine that cannot answer. {ADVICE}"
        )

    def _stall_message(self, stalled: float) -> str:
        states = []
        for p in self.processes:
            try:
                state = p.status()
            except psutil.NoSuchProcess:
                state = "gone"
            note = (
                " (by SIGSTOP or SIGTSTP: a debugger, Ctrl-Z or a job-control signal)"
                if state == psutil.STATUS_STOPPED
                else ""
            )
            states.append(f"{self.titles.get(p.pid, 'engine process')} (pid {p.pid}) {state}{note}")
        return (
            f"the teacher engine finished no scheduler step for {stalled:.0f} s "
            f"(teacher.engine.step_timeout_s = {self.cfg.step_timeout_s:g}); its processes: {'; '.join(states)}. "
            f"If it is only slow (a long window on a slow device, heavy swapping), raise teacher.engine.step_timeout_s "
            f"or lower max_num_batched_tokens. {ADVICE}"
        )

    def _fail(self, message: str, cause: BaseException | None = None):
        """End the broken engine (every process at once: it can no longer answer), free its slot,
        and raise ``EngineFailure``. A call still blocked inside vLLM is woken with the error."""
        self.failure = message
        for p in self.processes:
            try:
                p.kill()  # SIGKILL acts on a stopped process too; SIGTERM would wait for a SIGCONT
            except psutil.NoSuchProcess:
                pass
        queue = getattr(getattr(getattr(self.llm, "llm_engine", None), "engine_core", None), "outputs_queue", None)
        if queue is not None:
            queue.put_nowait(EngineFailure(message))
        self.close()
        raise EngineFailure(message) from cause

    def close(self) -> None:
        """Shut the engine down, end any of its processes that outlive the shutdown, then free
        the slot: a slot is free only once its engine is gone."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
            leftovers = descendants_alive(getattr(self, "processes", []))
            if leftovers:
                end_processes(leftovers)
        if getattr(self, "slot", None) is not None:
            self.slot.release()
            self.slot = None


def _prompts(batch: Sequence[Sequence[int]], images: Sequence | None, offset: int) -> list[dict]:
    """vLLM prompts of token-id windows; with ``images`` (one ``(PIL image, span)`` per window of
    the whole call, ``offset``: this batch's first), each window's image as its multimodal data and
    its expanded image tokens (``span``, ``distill.vision.prompt_with_span``) folded back into the
    placeholder, which vLLM expands again: its positions are the window's."""
    if images is None:
        return [{"prompt_token_ids": [int(t) for t in ids]} for ids in batch]
    return [
        {"prompt_token_ids": engine_prompt(ids, span), "multi_modal_data": {"image": image}}
        for ids, (image, span) in zip(batch, images[offset : offset + len(batch)])
    ]


def _title(proc) -> str:
    """A process's title (vLLM names its processes ``VLLM::EngineCore``, ``VLLM::Worker``...)."""
    try:
        return " ".join(" ".join(proc.cmdline()).split())[:80] or proc.name()  # setproctitle pads with spaces
    except psutil.Error:
        return "engine process"


def _count_steps(llm, last_step: list) -> None:
    """Note in ``last_step[0]`` when the engine finishes each scheduler step (``LLM.generate``
    loops over ``llm_engine.step()``); without that hook a whole call counts as one step."""
    engine = getattr(llm, "llm_engine", None)
    step = getattr(engine, "step", None)
    if step is None:
        return

    def counted_step(*args, **kwargs):
        outputs = step(*args, **kwargs)
        last_step[0] = time.monotonic()
        return outputs

    engine.step = counted_step


def _engine_dead(llm) -> bool:
    resources = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "resources", None)
    return bool(getattr(resources, "engine_dead", False))


def _exit_status(llm, pid: int) -> int | None:
    """How process ``pid`` ended, as ``multiprocessing`` reports it (negative: the signal), from
    vLLM's handle on its engine-core process, or from ``/proc`` while it is an unreaped zombie."""
    resources = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "resources", None)
    for proc in getattr(getattr(resources, "engine_manager", None), "processes", None) or []:
        if getattr(proc, "pid", None) == pid:
            deadline = time.monotonic() + 2  # vLLM's own monitor reaps it moments after it died
            while proc.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.exitcode is not None:
                return proc.exitcode
    try:  # field 52 of a zombie's stat: its status as waitpid reports it
        status = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return -(status & 0x7F) if status & 0x7F else status >> 8


def _oom_record(pid: int) -> str | None:
    """The kernel log's line on its out-of-memory killer taking ``pid``; ``""`` when the log has
    none, None when the log is not readable here."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if log.returncode != 0 or not log.stdout:
        return None
    for line in reversed(log.stdout.splitlines()):
        if f"Killed process {pid} " in line or ("oom-kill:" in line and f",pid={pid}," in line):
            return line.strip()
    return ""


def flat_to_labels(flat, input_ids: np.ndarray, label_start: int, k: int) -> dict:
    """Turn vLLM ``FlatLogprobs`` of one prompt into position-aligned label arrays.

    ``flat`` position ``p`` (``1 <= p < L``) is the distribution that predicted token ``p``,
    i.e. the label of window position ``t = p - 1``. Returns for positions ``label_start .. L-2``:
    ``topk_ids`` (n, k), ``topk_logprobs`` (n, k), ``target_logprobs`` (n,), ``tail_mass`` (n,).
    """
    labels = _flat_positions(flat, 1, np.asarray(input_ids)[1:], k)
    return {name: values[label_start:] for name, values in labels.items()}


def _flat_positions(flat, first: int, realized: np.ndarray, k: int) -> dict:
    """Labels of flat positions ``first ..`` whose realized (prompt or sampled) tokens are
    ``realized``: each position holds the realized token first, then ranks ``1..k``."""
    n = len(realized)
    starts = np.asarray(flat.start_indices[first:])
    ends = np.asarray(flat.end_indices[first:])
    if len(starts) != n or not np.all(ends - starts == k + 1):
        raise RuntimeError(
            f"unexpected logprobs layout: {len(starts)} positions for {n} tokens, "
            f"widths {set((ends - starts).tolist())}"
        )
    if n == 0:
        return {
            "topk_ids": np.zeros((0, k), np.int64),
            "topk_logprobs": np.zeros((0, k), np.float32),
            "target_logprobs": np.zeros(0, np.float32),
            "tail_mass": np.zeros(0, np.float32),
        }
    lo, hi = starts[0], ends[-1]
    token_ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(n, k + 1)
    logprobs = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(n, k + 1)
    if not np.array_equal(token_ids[:, 0], realized):
        raise RuntimeError("logprobs are not aligned with the realized tokens")
    topk_lp = logprobs[:, 1:]
    tail = 1.0 - np.exp(topk_lp.astype(np.float64)).sum(axis=1)
    return {
        "topk_ids": token_ids[:, 1:],
        "topk_logprobs": topk_lp,
        "target_logprobs": logprobs[:, 0],
        "tail_mass": np.clip(tail, 0.0, 1.0).astype(np.float32),
    }
