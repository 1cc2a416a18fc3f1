"""A small vision-language teacher built here from the text teacher, since no VLM weights can be
downloaded: an Idefics3 checkpoint (the SmolVLM architecture, which transformers and vLLM both
load) whose text model is the text teacher's, with a small randomly initialised vision encoder and
connector trained on the synthetic image task of ``distill.synthetic``.

Training has two phases, both on ``cfg.train_examples`` examples:

1. Alignment, one cheap pass without the text model: the connector's image tokens are pulled
   towards the input embeddings of the answer words (``alignment_loss``), so they start out as
   words the text model already reads. Learnt through the text model alone, the same image tokens
   stay at chance for a hundred steps that each cost as much as this whole pass.
2. Answer-token cross-entropy through the text model, ``cfg.steps`` steps: the prompt is
   ``distill.vision.prompt_ids`` of the image and question (the one agreed tokenization), the
   target ``distill.vision.answer_ids`` (the answer, then EOS); the alignment loss stays on.

With ``text_lr`` 0 the text model stays the text teacher, so only the image tokens it reads are
learnt. Held-out accuracy counts an example correct when, teacher-forced, the argmax at every answer
position is the answer's token: exactly when greedy decoding writes the answer, then stops.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
)

from distill import synthetic
from distill.teacher.config import VisionTeacherConfig
from distill.teacher.finetune import lr_at
from distill.vision import CHAT_TEMPLATE, answer_ids, pixel_inputs, prompt_ids

VLM_INFO = "vlm.json"
# the tokens an Idefics3 processor writes around and for an image; SmolLM2's tokenizer has none
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
EVAL_BATCH = 64
ANSWER_WORDS = tuple(a for kind in synthetic.KINDS for a in synthetic.ANSWERS[kind])
ALIGN_TEMPERATURE = 30.0  # on cosine similarities: a softmax over a kind's 4-6 answer words that can be sharp


def training_examples(cfg: VisionTeacherConfig) -> list:
    """The synthetic examples the teacher is trained on (a stream of their own: no dataset written
    with ``distill.synthetic.write_dataset`` repeats them)."""
    return synthetic.examples(cfg.train_examples, cfg.seed, cfg.image_size, synthetic.STREAM_TEACHER_TRAIN)


def held_out_examples(cfg: VisionTeacherConfig) -> list:
    """The synthetic examples the teacher's accuracy is measured on, none of them trained on."""
    return synthetic.examples(cfg.eval_examples, cfg.seed, cfg.image_size, synthetic.STREAM_TEACHER_EVAL)


def sincos_positions(side: int, dim: int, scale: float = 0.3) -> torch.Tensor:
    """2-D sine-cosine position embeddings of a ``side`` x ``side`` patch grid, (side^2, dim), row-major
    as the encoder numbers patches (MAE's fixed embeddings, here only the start of learnt ones). The
    default random start (std 0.02, against patch embeddings of std ~0.3) leaves a patch's place
    nearly invisible, and questions about where a shape is stay at chance for thousands of examples."""
    quarter = dim // 4
    freqs = 1.0 / 100 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    grid = torch.arange(side, dtype=torch.float32)
    rows, cols = (g.flatten()[:, None] * freqs for g in torch.meshgrid(grid, grid, indexing="ij"))  # (side^2, dim/4)
    table = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], 1)
    return scale * F.pad(table, (0, dim - table.shape[1]))


def assemble(base_dir: Path, cfg: VisionTeacherConfig) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The untrained teacher and its processor: the text model of ``base_dir`` with its vocabulary
    grown by the image tokens (their embeddings start at the mean embedding, a neutral point), and
    a vision encoder and connector initialised from ``cfg.seed``."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{base_dir}: the tokenizer has no EOS token; an answer could not end")
    text_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    text = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    text_config = text.config.to_dict()
    text_config.pop("_name_or_path", None)  # a local path: it would make the checkpoint depend on where it was built
    text_config["vocab_size"] = len(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = Idefics3Config(
        text_config=text_config,
        vision_config={
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": 4 * cfg.vision_hidden,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
        },
        scale_factor=cfg.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():
        position = model.model.vision_model.embeddings.position_embedding.weight  # (patches, D)
        position.copy_(sincos_positions(cfg.image_size // cfg.patch_size, cfg.vision_hidden))
    weights = text.model.state_dict()
    embed = weights["embed_tokens.weight"]  # (V_text, H)
    with torch.no_grad():  # image tokens start at the scale of the text embeddings (the default is 4x larger)
        projection = model.model.connector.modality_projection.proj
        projection.weight.normal_(0.0, float(embed.std()) / math.sqrt(projection.in_features))
    new_rows = embed.mean(0, keepdim=True).expand(len(tokenizer) - text_vocab, -1)
    weights["embed_tokens.weight"] = torch.cat([embed, new_rows])
    model.model.text_model.load_state_dict(weights, strict=True)
    assert model.lm_head.weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id
    )
    size = {"longest_edge": cfg.image_size}
    image_processor = Idefics3ImageProcessor(do_resize=True, size=size, do_image_splitting=False, max_image_size=size)
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=cfg.image_tokens,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


@dataclasses.dataclass
class Encoded:
    """Examples as the model takes them: token ids per example, pixel inputs stacked."""

    prompts: list[list[int]]
    answers: list[list[int]]
    kinds: list[str]
    pixel_values: torch.Tensor  # (N, 1, 3, S, S)
    pixel_attention_mask: torch.Tensor  # (N, 1, S, S)
    words: torch.Tensor  # (N,) the answer's index in ANSWER_WORDS
    allowed: torch.Tensor  # (N, len(ANSWER_WORDS)) bool: the answers of the example's kind


def encode(processor, examples: list, chunk: int = 256) -> Encoded:
    """Token ids and pixel inputs of synthetic ``examples`` (image, question, answer)."""
    prompts, cache = [], {}
    for image, question, _ in examples:
        key = (question, image.size)  # the expansion of the image placeholder depends on the size only
        if key not in cache:
            cache[key] = prompt_ids(processor, image, question)
        prompts.append(cache[key])
    pixels = [pixel_inputs(processor, [e[0] for e in examples[i : i + chunk]]) for i in range(0, len(examples), chunk)]
    kinds = [synthetic.kind_of(question) for _, question, _ in examples]
    return Encoded(
        prompts=prompts,
        answers=[answer_ids(processor, answer) for _, _, answer in examples],
        kinds=kinds,
        pixel_values=torch.cat([p["pixel_values"] for p in pixels]),
        pixel_attention_mask=torch.cat([p["pixel_attention_mask"] for p in pixels]),
        words=torch.tensor([ANSWER_WORDS.index(answer) for _, _, answer in examples]),
        allowed=torch.tensor([[w in synthetic.ANSWERS[k] for w in ANSWER_WORDS] for k in kinds]),
    )


def image_tokens(model, data: Encoded, rows):
    """The connector's output for examples ``rows`` (its ``pooler_output``: (B, image tokens, H)), in
    the form the model's forward takes back as ``mm_encoder_outputs``."""
    return model.model.get_image_features(
        data.pixel_values[rows].to(model.device), data.pixel_attention_mask[rows].to(model.device), return_dict=True
    )


def answer_directions(model, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions of ANSWER_WORDS in the text model's input embeddings, (A, H), measured from
    the embeddings' mean (H,), which every row shares and would dominate a cosine."""
    embed = model.model.text_model.embed_tokens.weight.detach()  # (V, H)
    centre = embed.mean(0)
    ids = [processor.tokenizer(word, add_special_tokens=False)["input_ids"] for word in ANSWER_WORDS]
    directions = torch.stack([embed[i].mean(0) - centre for i in ids])  # a word of two tokens: their mean
    return F.normalize(directions, dim=-1), centre


def alignment_loss(image_hidden: torch.Tensor, words: torch.Tensor, allowed: torch.Tensor, directions, centre):
    """Cross-entropy of the right answer word among its kind's, scored by its best cosine with any of
    an image's tokens: image_hidden (B, T, H), words (B,), allowed (B, A), directions (A, H)."""
    cosines = F.normalize(image_hidden - centre, dim=-1) @ directions.T  # (B, T, A)
    scores = (ALIGN_TEMPERATURE * cosines.amax(1)).masked_fill(~allowed, float("-inf"))  # (B, A)
    return F.cross_entropy(scores, words)


def answer_logits(model, data: Encoded, rows, pad_id: int, image=None) -> tuple[torch.Tensor, ...]:
    """Teacher-forced logits at the answer positions of examples ``rows``: (logits (B, A, V),
    targets (B, A), mask (B, A)), A the longest answer; ``image`` is their ``image_tokens`` when
    already computed. Only these positions go through the LM head, which is most of the cost of a
    full-vocabulary output on 40-token examples."""
    device = model.device
    seqs = [data.prompts[r] + data.answers[r][:-1] for r in rows]  # the last answer token (EOS) is never input
    T, A = max(map(len, seqs)), max(len(data.answers[r]) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    positions = torch.zeros(len(rows), A, dtype=torch.long)
    targets = torch.full((len(rows), A), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), A, dtype=torch.bool)
    for b, (r, seq) in enumerate(zip(rows, seqs)):
        input_ids[b, : len(seq)] = torch.as_tensor(seq)
        attention[b, : len(seq)] = 1
        n, start = len(data.answers[r]), len(data.prompts[r]) - 1  # the prompt's last token predicts the first
        positions[b, :n] = torch.arange(start, start + n)
        targets[b, :n] = torch.as_tensor(data.answers[r])
        mask[b, :n] = True
    hidden = model.model(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        mm_encoder_outputs={"image": image if image is not None else image_tokens(model, data, rows)},
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    picked = hidden.gather(1, positions.to(device)[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, A, H)
    return model.lm_head(picked), targets.to(device), mask.to(device)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (mask True), EOS included."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate(model, processor, data: Encoded) -> dict:
    """Held-out accuracy (overall and per kind, beside each kind's chance level) and mean answer-token
    loss. Correct means the argmax at every answer position is the answer's token."""
    model.eval()
    pad_id = processor.tokenizer.pad_token_id
    correct, loss_sum, tokens = [], 0.0, 0
    for i in range(0, len(data.prompts), EVAL_BATCH):
        rows = list(range(i, min(i + EVAL_BATCH, len(data.prompts))))
        logits, targets, mask = answer_logits(model, data, rows, pad_id)
        correct += ((logits.argmax(-1) == targets) | ~mask).all(-1).tolist()
        loss_sum += float(answer_loss(logits, targets, mask)) * int(mask.sum())
        tokens += int(mask.sum())
    per_kind = {
        kind: float(np.mean([c for c, k in zip(correct, data.kinds) if k == kind]))
        for kind in synthetic.KINDS
        if kind in data.kinds
    }
    return {
        "accuracy": float(np.mean(correct)),
        "per_kind": per_kind,
        "chance": float(np.mean([synthetic.CHANCE[k] for k in data.kinds])),
        "per_kind_chance": {kind: synthetic.CHANCE[kind] for kind in per_kind},
        "loss": loss_sum / tokens,
        "examples": len(correct),
    }


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    """``steps`` batches of example indices, drawn without replacement, reshuffled each pass."""
    order: list[int] = []
    for _ in range(steps):
        rows = []
        while len(rows) < batch_size:
            if not order:
                order = list(rng.permutation(n))
            rows.append(int(order.pop()))
        yield rows


def _optimize(model, groups, loss_fn, batches, cfg: VisionTeacherConfig, desc: str, progress: bool):
    """AdamW over the parameter ``groups`` (warmup then cosine from each group's ``base_lr``,
    gradients clipped to norm 1) over ``batches``; returns each step's loss."""
    params = [p for g in groups for p in g["params"]]
    steps = len(batches)
    schedule = dataclasses.replace(cfg, steps=steps)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    losses = []
    model.train()
    bar = tqdm(batches, desc=desc, disable=not progress)
    for step, rows in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_at(step, schedule) / cfg.lr
        loss = loss_fn(rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{desc}: loss is {losses[-1]} at step {step}; lower teacher.vision.lr")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def train(model, processor, data: Encoded, cfg: VisionTeacherConfig, progress: bool = True) -> dict[str, list[float]]:
    """Both phases (the module docstring): one alignment pass over ``data``, then ``cfg.steps`` steps
    through the text model, which only learns itself when ``cfg.text_lr`` > 0. Returns each phase's
    per-step losses."""
    text_params = list(model.model.text_model.parameters())  # the LM head is tied to its embeddings
    for p in text_params:
        p.requires_grad_(cfg.text_lr > 0)
    text_ids = {id(p) for p in text_params}
    image_params = [p for p in model.parameters() if id(p) not in text_ids]  # vision encoder and connector
    directions, centre = answer_directions(model, processor)
    pad_id = processor.tokenizer.pad_token_id
    rng = np.random.default_rng(cfg.seed)

    def aligned(image, rows):
        return alignment_loss(image.pooler_output, data.words[rows], data.allowed[rows], directions, centre)

    def align(rows):
        return aligned(image_tokens(model, data, rows), rows)

    def answer(rows):
        image = image_tokens(model, data, rows)
        return answer_loss(*answer_logits(model, data, rows, pad_id, image)) + aligned(image, rows)

    n = len(data.prompts)
    one_pass = list(_batches(n, cfg.batch_size, max(1, n // cfg.batch_size), rng))
    groups = [{"params": image_params, "base_lr": cfg.lr}]
    align_losses = _optimize(model, groups, align, one_pass, cfg, "align image tokens", progress)
    if cfg.text_lr > 0:
        groups.append({"params": text_params, "base_lr": cfg.text_lr})
    batches = list(_batches(n, cfg.batch_size, cfg.steps, rng))
    answer_losses = _optimize(model, groups, answer, batches, cfg, "vision teacher", progress)
    return {"align": align_losses, "answer": answer_losses}


def _tail_mean(losses: list[float]) -> float:
    return float(np.mean(losses[-max(1, len(losses) // 10) :]))


def build_vlm(base_dir: Path, cfg: VisionTeacherConfig, out: Path, progress: bool = True) -> dict:
    """Build the vision-language teacher from the text checkpoint in ``base_dir``, train it, measure
    it on held-out examples and save it to ``out`` atomically (a temporary folder renamed into
    place): weights, processor, tokenizer, chat template, generation config and ``vlm.json``, the
    summary this returns."""
    base_dir, out = Path(base_dir), Path(out)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = assemble(base_dir, cfg)
    model.to(device)
    train_data, eval_data = encode(processor, training_examples(cfg)), encode(processor, held_out_examples(cfg))
    losses = train(model, processor, train_data, cfg, progress)
    held_out = evaluate(model, processor, eval_data)
    summary = {
        "base": str(base_dir),
        "settings": dataclasses.asdict(cfg),
        "image_tokens": cfg.image_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "align_first_loss": losses["align"][0],
        "align_final_loss": _tail_mean(losses["align"]),
        "first_loss": losses["answer"][0],
        "final_loss": _tail_mean(losses["answer"]),
        "losses": losses["answer"],
        **held_out,
        "seconds": time.perf_counter() - t0,
        "device": device.type,
    }
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / VLM_INFO).write_text(json.dumps(summary, indent=1))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_kind = ", ".join(f"{k} {a:.2f} (chance {synthetic.CHANCE[k]:.2f})" for k, a in held_out["per_kind"].items())
    print(
        f"vision teacher {out.name}: held-out accuracy {held_out['accuracy']:.3f} (chance {held_out['chance']:.3f}; "
        f"{per_kind}) after {cfg.steps} steps, {summary['seconds']:.0f} s"
    )
    return summary
