"""Text conditioning without downloads: a CLIP-format tokenizer built from a data set's captions, and a small
`CLIPTextModel` trained from scratch with it.

The tokenizer is a transformers `CLIPTokenizer` (lower-casing, CLIP's pre-tokenizer, byte-level BPE with `</w>`
word ends), so `save_pretrained` / `from_pretrained` and diffusers' `StableDiffusionPipeline` treat it like the
tokenizer of Stable Diffusion. Its vocabulary is learnt from the captions with the `tokenizers` library.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
# CLIP's pre-tokenizer: words, single digits and runs of punctuation (transformers' CLIPTokenizer uses the same).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _clip_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_caption_tokenizer(
    captions: Iterable[str], vocab_size: int = 1000, model_max_length: int = 16
) -> CLIPTokenizer:
    """Learn a byte-level BPE vocabulary from `captions` and wrap it as a `CLIPTokenizer`.

    Every byte, alone and as a word end, is in the vocabulary, so any prompt encodes without unknown tokens:
    words never seen in the captions fall apart into smaller pieces rather than into `<|endoftext|>`.
    """
    if model_max_length < 3:
        raise ValueError(f"model_max_length={model_max_length} leaves no room between the start and end tokens")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = _clip_pipeline(Tokenizer(models.BPE(end_of_word_suffix=WORD_END, continuing_subword_prefix="")))
    # The trainer numbers a word-final symbol ("e</w>") when it first meets it, in hash order, which differs from one
    # process to the next; ties between equally frequent merges are broken by those numbers, so the vocabulary was
    # not a function of the captions. Declared up front (as reserved tokens), every symbol has a fixed number.
    word_ends = [symbol + WORD_END for symbol in alphabet]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(word_ends),  # the reserved forms do not take the place of merges
        special_tokens=[BOS, EOS, *word_ends],
        end_of_word_suffix=WORD_END,
        initial_alphabet=alphabet,
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])  # the word-final forms of every byte are in it (reserved above)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def text_encoder_from_scratch(
    tokenizer: CLIPTokenizer,
    hidden_size: int = 64,  # width of the token embeddings and of the encoder's hidden states
    num_hidden_layers: int = 2,  # transformer layers
    num_attention_heads: int = 4,  # attention heads per layer
    intermediate_size: int = 128,  # MLP width
    encoder_class: type[CLIPTextModel] = CLIPTextModel,  # or CLIPTextModelWithProjection (pooled `text_embeds`, SD3)
    projection_dim: int | None = None,  # width of the pooled projection (WithProjection); None: hidden_size
) -> CLIPTextModel:
    """A randomly initialised `encoder_class` sized to `tokenizer`, to be trained jointly with the denoiser."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or hidden_size,
    )
    return encoder_class(config)


def tokenize_prompts(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (B, model_max_length), padded; a prompt over the limit is truncated with a warning naming it.

    Truncation (rather than an error) is what Stable Diffusion pipelines do; the warning makes it visible.
    """
    limit = tokenizer.model_max_length
    for prompt in prompts:
        length = len(tokenizer(prompt).input_ids)
        if length > limit:
            log.warning("prompt %r has %d tokens; only the first %d are used", prompt, length, limit)
    encoded = tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
    return encoded.input_ids
