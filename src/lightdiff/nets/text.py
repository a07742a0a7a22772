"""Text conditioning without downloads: tokenizers built from a data set's captions, and small text encoders
trained from scratch with them.

- CLIP: a transformers `CLIPTokenizer` (lower-casing, CLIP's pre-tokenizer, byte-level BPE with `</w>` word ends),
  so `save_pretrained` / `from_pretrained` and diffusers' pipelines treat it like Stable Diffusion's; a
  `CLIPTextModel` (or `...WithProjection`).
- T5 (FLUX, SD3): a transformers `T5Tokenizer` (SentencePiece-style unigram over "▁"-prefixed words, `</s>` appended,
  `<pad>` = 0), as FLUX's `tokenizer_2` is; a `T5EncoderModel`.
- Qwen2 (Qwen-Image): a transformers `Qwen2Tokenizer` (Qwen2's pre-tokenizer, byte-level BPE, the chat-template special
  tokens); a `Qwen2_5_VLForConditionalGeneration`.
The vocabularies are learnt from the captions with the `tokenizers` library.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLProcessor,
    Qwen3Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5EncoderModel,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from lightdiff.files import module_fingerprint

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


# T5's special tokens and their ids, as T5Tokenizer numbers them: <pad> = 0, </s> = 1, <unk> = 2.
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
# Characters always in a built T5 vocabulary (printable ASCII): a prompt in them never falls into <unk>.
_T5_ALPHABET = [chr(code) for code in range(33, 127)]
WORD_START = "▁"  # SentencePiece's mark of a word's first piece


def build_t5_tokenizer(captions: Iterable[str], vocab_size: int = 1000, model_max_length: int = 32) -> T5Tokenizer:
    """A `T5Tokenizer` (a unigram model, T5's word splitting and "▁" word starts, `</s>` appended) whose pieces are
    the captions' `vocab_size` most frequent words, each scored by its log frequency, and every printable character
    far below them, so a known word is one token and an unknown one falls apart into characters, never into <unk>.

    Whole words rather than a trained unigram model: the `tokenizers` library's UnigramTrainer on a few hundred short
    captions keeps fragments ("▁", "re", "d" for "red") and orders equally scored pieces in hash order, so its ids
    were neither useful nor a function of the captions; these are both (ties are broken alphabetically)."""
    if model_max_length < 2:
        raise ValueError(f"model_max_length={model_max_length} leaves no room for a token before </s>")
    splitter = T5Tokenizer(vocab=None, extra_ids=0).backend_tokenizer.pre_tokenizer  # T5's own word splitting
    counts: Counter[str] = Counter(
        word for caption in captions for word, _ in splitter.pre_tokenize_str(" ".join(str(caption).split()))
    )
    words = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:vocab_size]
    total = sum(counts.values()) or 1
    vocab = [(token, 0.0) for token in T5_SPECIAL_TOKENS] + [(word, math.log(count / total)) for word, count in words]
    known = {word for word, _ in words}
    floor = math.log(1 / total) - 10.0  # any word in the vocabulary outscores its spelling
    vocab += [(piece, floor) for piece in [WORD_START, *_T5_ALPHABET] if piece not in known]
    return t5_tokenizer_from_vocab(vocab, model_max_length)


def t5_tokenizer_from_vocab(vocab: list[tuple[str, float]], model_max_length: int) -> T5Tokenizer:
    """A `T5Tokenizer` of a unigram vocabulary [(piece, score), ...] whose first pieces are `T5_SPECIAL_TOKENS`."""
    if tuple(piece for piece, _ in vocab[: len(T5_SPECIAL_TOKENS)]) != T5_SPECIAL_TOKENS:
        raise ValueError(f"a T5 vocabulary starts with {T5_SPECIAL_TOKENS}, this one with {vocab[:3]}")
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_encoder_from_scratch(
    tokenizer: T5Tokenizer,
    d_model: int = 64,  # width of the token embeddings and of the encoder's states (FLUX's joint_attention_dim)
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,  # MLP width
    encoder_class: type[T5EncoderModel] | type[UMT5EncoderModel] = T5EncoderModel,  # Wan's: UMT5EncoderModel
) -> T5EncoderModel | UMT5EncoderModel:
    """A randomly initialised `T5EncoderModel` (or UMT5, whose layers each have their own relative position bias and a
    gated-GELU MLP) sized to `tokenizer`, trained jointly with the denoiser; no dropout, as the CLIP encoders built
    here (a from-scratch encoder is small and trains on few captions)."""
    config = encoder_class.config_class(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return encoder_class(config)


def tokenize_prompts(
    tokenizer: CLIPTokenizer | T5Tokenizer, prompts: Sequence[str], max_length: int | None = None
) -> torch.Tensor:
    """Token ids (B, max_length), padded; a prompt over the limit is truncated with a warning naming it. `max_length`:
    the tokenizer's `model_max_length` (CLIP), or a pipeline's `max_sequence_length` (T5).

    Truncation (rather than an error) is what Stable Diffusion pipelines do; the warning makes it visible.
    """
    limit = max_length or tokenizer.model_max_length
    for prompt in prompts:
        length = len(tokenizer(prompt).input_ids)
        if length > limit:
            log.warning("prompt %r has %d tokens; only the first %d are used", prompt, length, limit)
    encoded = tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
    return encoded.input_ids


# ----- tokenizers and encoders as plain data (checkpoints, the text cache's key) ------------------------------------


def text_encoder_fingerprint(tokenizer: Any, text_encoder: torch.nn.Module) -> str:
    """Hash of a transformers tokenizer (vocabulary, merges, length limit) and text encoder (config, weights)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    for call_state in ("truncation", "padding"):  # set by the last call, not part of what the tokenizer is
        backend.pop(call_state, None)
    tokenizer_state = {"tokenizer": backend, "max_length": tokenizer.model_max_length}
    return module_fingerprint({**text_encoder.config.to_dict(), **tokenizer_state}, text_encoder)


TEXT_ENCODER_CLASSES: dict[str, type] = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


def tokenizer_state(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """A CLIP tokenizer as plain data (vocabulary, merges, length limit) for a weights-only checkpoint."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    return {
        "vocab": dict(model["vocab"]),
        "merges": merges,
        "model_max_length": tokenizer.model_max_length,
        # SD 2.x's and SDXL's second tokenizer pad with "!", not the end token: other ids, other states
        "pad_token": str(tokenizer.pad_token),
    }


def tokenizer_from_state(state: dict[str, Any]) -> CLIPTokenizer:
    merges = [tuple(pair) for pair in state["merges"]]
    return CLIPTokenizer(
        vocab=state["vocab"],
        merges=merges,
        model_max_length=state["model_max_length"],
        pad_token=state.get("pad_token", EOS),  # checkpoints from before it was recorded: CLIPTokenizer's default
    )


def tokenizer_for(text_encoder: torch.nn.Module, state: dict[str, Any]) -> CLIPTokenizer:
    """A checkpoint's tokenizer (`tokenizer_state`), refused if its vocabulary is not the one `text_encoder` embeds."""
    tokenizer = tokenizer_from_state(state)
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(
            f"the checkpoint's tokenizer has {len(tokenizer)} tokens, the text encoder embeds "
            f"{text_encoder.config.vocab_size}"
        )
    return tokenizer


def t5_tokenizer_state(tokenizer: T5Tokenizer) -> dict[str, Any]:
    """A T5 tokenizer as plain data (its unigram pieces with their scores, length limit)."""
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    return {
        "vocab": [[str(piece), float(score)] for piece, score in vocab],
        "model_max_length": tokenizer.model_max_length,
    }


def t5_tokenizer_for(text_encoder: torch.nn.Module, state: dict[str, Any]) -> T5Tokenizer:
    """A checkpoint's T5 tokenizer (`t5_tokenizer_state`), refused if `text_encoder` embeds another vocabulary."""
    tokenizer = t5_tokenizer_from_vocab([(piece, score) for piece, score in state["vocab"]], state["model_max_length"])
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(
            f"the checkpoint's T5 tokenizer has {len(tokenizer)} tokens, the T5 encoder embeds "
            f"{text_encoder.config.vocab_size}"
        )
    return tokenizer


# ----- Qwen2 (Qwen-Image's text encoder) ----------------------------------------------------------------------------

# Qwen2's pre-tokenizer (transformers' Qwen2Tokenizer rebuilds it on load, so the merges are learnt with the same)
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
# the chat template's special tokens, ids 0.. in this order (<|endoftext|> pads, as Qwen's)
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# how often the templates' words are repeated in the corpus the merges are learnt from: enough that each becomes one
# token before any caption's word does (a Qwen pipeline drops a fixed number of the template's tokens)
TEMPLATE_WEIGHT = 20


def build_qwen2_tokenizer(captions: Iterable[str], templates: Sequence[str], vocab_size: int = 2000) -> Qwen2Tokenizer:
    """A `Qwen2Tokenizer`: byte-level BPE learnt from `captions` and the pipeline's prompt `templates`, with Qwen2's
    pre-tokenizer and special tokens. Every word of the templates is one token, as in Qwen's own vocabulary, so a
    template's system prefix has as many tokens as Qwen's (QwenImagePipeline drops a fixed 34 of them)."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(QWEN2_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [str(caption) for caption in captions] + [t.replace("{}", "") for t in templates] * TEMPLATE_WEIGHT
    backend.train_from_iterator(corpus, trainer)
    model = json.loads(backend.to_str())["model"]
    return qwen2_tokenizer_from_vocab(model["vocab"], model["merges"])


def qwen2_tokenizer_from_vocab(
    vocab: dict[str, int], merges: Sequence[Any], chat_template: str | None = None
) -> Qwen2Tokenizer:
    """A `Qwen2Tokenizer` of a BPE vocabulary and merges whose first ids are `QWEN2_SPECIAL_TOKENS` (with the chat
    template a pipeline formats prompts through, if it uses one: Z-Image's `apply_chat_template`)."""
    pairs = [tuple(merge) if isinstance(merge, list | tuple) else tuple(merge.split(" ")) for merge in merges]
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=pairs,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = chat_template
    return tokenizer


def qwen2_tokenizer_state(tokenizer: Qwen2Tokenizer) -> dict[str, Any]:
    """A Qwen2 tokenizer as plain data (its BPE vocabulary and merges, and its chat template if it has one)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [list(merge) if isinstance(merge, list | tuple) else merge.split(" ") for merge in model["merges"]]
    state = {"vocab": dict(model["vocab"]), "merges": merges}
    if tokenizer.chat_template:
        state["chat_template"] = tokenizer.chat_template
    return state


def qwen2_tokenizer_for(text_encoder: torch.nn.Module, state: dict[str, Any]) -> Qwen2Tokenizer:
    """A checkpoint's Qwen2 tokenizer (`qwen2_tokenizer_state`), refused if `text_encoder` embeds fewer tokens."""
    tokenizer = qwen2_tokenizer_from_vocab(state["vocab"], state["merges"], state.get("chat_template"))
    embedded = text_encoder.config.get_text_config().vocab_size  # Qwen2.5-VL's language model, or a Qwen3
    if len(tokenizer) > embedded:
        raise ValueError(f"the checkpoint's Qwen2 tokenizer has {len(tokenizer)} tokens, the encoder embeds {embedded}")
    return tokenizer


def qwen_vl_from_scratch(
    tokenizer: Qwen2Tokenizer, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2
) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised `Qwen2_5_VLForConditionalGeneration` (Qwen-Image's text encoder class) sized to
    `tokenizer`: its language model `hidden_size` wide (the transformer's joint_attention_dim), grouped-query
    attention with one key-value head, multimodal rotary sections in Qwen2.5-VL's 2 : 3 : 3 proportion of half a
    head, and a one-layer vision tower (the class has one; text-to-image never runs it)."""
    head_dim = hidden_size // num_heads
    if head_dim % 4 or hidden_size % num_heads:
        raise ValueError(f"a Qwen2.5-VL of width {hidden_size} with {num_heads} heads: each head's width must be 4k")
    half = head_dim // 2
    sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # Qwen2.5-VL's [16, 24, 24] at 128
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden_size,  # image features replace <|image_pad|> embeddings
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


# Qwen3's chat template for what the image pipelines send it (Z-Image, FLUX.2 [klein]): user messages, the generation
# prompt, and the empty thinking block it adds when thinking is off. Qwen3's own template renders these messages to
# the same text; a pretrained tokenizer brings its own.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen3_config(
    tokenizer: Qwen2Tokenizer, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2
) -> Qwen3Config:
    """A small Qwen3's config (Z-Image's `Qwen3Model`, FLUX.2 [klein]'s `Qwen3ForCausalLM`) sized to `tokenizer`:
    `hidden_size` wide (what the transformer's text input takes), grouped-query attention with one key-value head."""
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"a Qwen3 of width {hidden_size} with {num_heads} heads: each head's width must be even")
    ids = tokenizer.convert_tokens_to_ids
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=1,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )


def _has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def qwen2_vl_processor(tokenizer: Qwen2Tokenizer, image_processor: BaseImageProcessor) -> Qwen2VLProcessor:
    """Qwen-Image-Edit's `Qwen2VLProcessor`: `image_processor` cuts an image into Qwen2.5-VL's patches and `tokenizer`
    reads the text with each `<|image_pad|>` repeated once per merged patch. Without torchvision (optional for
    lightdiff: its wheels pull a CUDA torch) transformers builds no video processor, and the processor's class check
    of the missing one fails in its own lookup; editing passes no video, so the processor is then built with that one
    check skipped for the absent video processor."""
    if _has_torchvision():
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor())
    check = ProcessorMixin.check_argument_for_proper_class

    def check_present(self: ProcessorMixin, name: str, argument: Any) -> Any:
        return None if argument is None else check(self, name, argument)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check_present):
        return Qwen2VLProcessor(image_processor, tokenizer, None)


def qwen2_vl_image_processor(settings: dict[str, Any] | None = None) -> BaseImageProcessor:
    """Qwen2.5-VL's image processor (transformers' defaults, or `settings`): the torchvision one where torchvision
    is installed, else the PIL one that transformers would fall back to (named here, so it says nothing)."""
    if _has_torchvision():
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(**(settings or {}))
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**(settings or {}))


def load_qwen2_vl_processor(source: str | Path, subfolder: str = "processor") -> Qwen2VLProcessor:
    """A pipeline's `processor/` (Qwen-Image-Edit's): `Qwen2VLProcessor.from_pretrained`, or, without torchvision,
    its tokenizer and image processor read from the same files (`qwen2_vl_processor`)."""
    if _has_torchvision():
        return Qwen2VLProcessor.from_pretrained(source, subfolder=subfolder)
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = Qwen2Tokenizer.from_pretrained(source, subfolder=subfolder)
    return qwen2_vl_processor(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(source, subfolder=subfolder))


def save_qwen2_vl_processor(processor: Qwen2VLProcessor, folder: Path) -> None:
    """What `Qwen2VLProcessor.from_pretrained` reads: the tokenizer's and the image processor's files (transformers
    takes the video processor's settings from the image processor's file when it has none of its own)."""
    if processor.video_processor is not None:
        processor.save_pretrained(folder)
        return
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
