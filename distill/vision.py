"""What every stage that handles images agrees on: how an image-and-question prompt and its answer
become token ids, and how images become the model's pixel inputs.

A vision-language teacher here is a transformers image-text-to-text checkpoint (Idefics3, the
SmolVLM architecture) whose processor expands one ``<image>`` placeholder in the prompt text into
the image's run of image tokens. The corpus stores those expanded ids, so the engine, the
trainer and the evaluation all see the same tokens: vLLM recognizes an already expanded prompt,
and transformers needs one image token per image feature. Imports of transformers stay inside
the functions (a config load imports this module's names without them).
"""

from __future__ import annotations

from typing import Sequence

IMAGE_PLACEHOLDER = "<image>"
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask")  # the image inputs of an Idefics3-style forward
# ChatML as SmolLM2 writes it, without its default system prompt (20 tokens on every example)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt_text(processor, question: str, system_prompt: str | None = None) -> str:
    """The chat-templated prompt of one image and ``question`` (the image first), with the
    assistant's turn opened: the text a processor expands and tokenizes."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
        {"role": "user", "content": IMAGE_PLACEHOLDER + question}
    ]
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(processor, image, question: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt for ``image`` (a PIL image) and ``question``, the image placeholder
    expanded by ``processor`` for this image's size."""
    return prompt_with_span(processor, image, question, system_prompt)[0]


def prompt_with_span(processor, image, question: str, system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """``prompt_ids`` and where the image's expansion lies in them: ``[start, end, placeholder]``,
    the ids ``start:end`` being what the processor made of the one ``placeholder`` token. vLLM
    expands a token prompt's placeholder itself (``engine_prompt``), so the engine is given the
    prompt with the span folded back into the placeholder."""
    text = prompt_text(processor, question, system_prompt)
    expanded = [int(t) for t in processor(text=[text], images=[[image]], add_special_tokens=False)["input_ids"][0]]
    plain = [int(t) for t in getattr(processor, "tokenizer", processor)(text, add_special_tokens=False)["input_ids"]]
    start = next((i for i, (a, b) in enumerate(zip(expanded, plain)) if a != b), min(len(expanded), len(plain)))
    tail = 0
    while tail < min(len(expanded), len(plain)) - start and expanded[-1 - tail] == plain[-1 - tail]:
        tail += 1
    if len(plain) - tail - start != 1:
        raise ValueError(
            f"the processor expanded {len(plain) - tail - start} prompt tokens for one image, expected its one "
            f"placeholder token ({IMAGE_PLACEHOLDER!r})"
        )
    return expanded, [start, len(expanded) - tail, plain[start]]


def engine_prompt(ids: Sequence[int], span: Sequence[int]) -> list[int]:
    """The prompt vLLM is given for ``ids`` whose image expansion is ``span`` (``prompt_with_span``):
    the expansion folded back into its placeholder token, which vLLM expands again, to the same ids."""
    start, end, placeholder = (int(x) for x in span)
    return [int(t) for t in ids[:start]] + [placeholder] + [int(t) for t in ids[end:]]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer as the teacher writes it: the text, then the end-of-turn token (the
    tokenizer's EOS, where generation stops)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no EOS token to end an answer with")
    return [int(t) for t in tokenizer(answer, add_special_tokens=False)["input_ids"]] + [int(tokenizer.eos_token_id)]


def pixel_inputs(processor, images: Sequence) -> dict:
    """The model's image inputs (``pixel_values``, ``pixel_attention_mask``: torch tensors) for one
    image per example, in order."""
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images=[[im] for im in images], return_tensors="pt")
    return {k: v for k, v in out.items() if k in PIXEL_KEYS}


def pixel_args(batch: dict) -> dict:
    """The image inputs of a collated batch, as a model's forward takes them (none for text rows)."""
    return {key: batch[key] for key in PIXEL_KEYS if key in batch}


class PixelInputs:
    """Pixel inputs of rows that name their image by hash: images opened from ``store``
    (``storage.images.ImageStore``) and processed by the image processor of ``model_dir`` (the
    teacher's: the student sees the pixels the teacher saw)."""

    def __init__(self, model_dir, store):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        if not hasattr(self.processor, "image_processor"):
            raise ValueError(f"{model_dir}: no image processor (processor_config.json); not a vision-language model")
        self.store = store

    def __call__(self, hashes: Sequence[str]) -> dict:
        return pixel_inputs(self.processor, [self.store.open(h) for h in hashes])
