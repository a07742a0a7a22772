"""The caption tokenizer (CLIP format, built offline) and the from-scratch text encoder."""

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from lightdiff.data.shapes import NUM_CLASSES, label_to_caption
from lightdiff.nets.text import build_caption_tokenizer, text_encoder_from_scratch, tokenize_prompts

CAPTIONS = [label_to_caption(label) for label in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_caption_tokenizer(CAPTIONS * 10, vocab_size=400, model_max_length=8)


def test_captions_become_whole_word_tokens(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    ids = tokenizer("a red circle").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 5
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red circle"


def test_unseen_words_split_into_pieces_not_unknowns(tokenizer: CLIPTokenizer) -> None:
    pieces = tokenizer.tokenize("A Purple hexagon!")
    assert tokenizer.unk_token not in pieces
    assert pieces[0] == "a</w>" and pieces[-1] == "!</w>" and len(pieces) > 4
    decoded = tokenizer.decode(tokenizer("A Purple hexagon!").input_ids, skip_special_tokens=True)
    assert decoded.strip() == "a purple hexagon !"  # CLIP decodes every word end as a space


def test_save_and_load_round_trip(tokenizer: CLIPTokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    for caption in CAPTIONS:
        assert loaded(caption).input_ids == tokenizer(caption).input_ids
    assert loaded.model_max_length == 8 and len(loaded) == len(tokenizer)


def test_long_prompts_are_truncated_with_a_warning(tokenizer: CLIPTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ids = tokenize_prompts(tokenizer, ["a red circle", "a red circle next to a blue square and a white triangle"])
    assert ids.shape == (2, 8)
    assert ids[1, -1].item() == tokenizer.eos_token_id  # truncation keeps the end token
    assert "only the first 8 are used" in caplog.text and "white triangle" in caplog.text
    assert ids[0, 4:].tolist() == [tokenizer.pad_token_id] * 4


def test_text_encoder_from_scratch_encodes_every_caption(tokenizer: CLIPTokenizer) -> None:
    torch.manual_seed(0)
    encoder = text_encoder_from_scratch(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    hidden = encoder(tokenize_prompts(tokenizer, CAPTIONS)).last_hidden_state
    assert hidden.shape == (NUM_CLASSES, 8, 32)
    assert torch.isfinite(hidden).all()
    assert not torch.allclose(hidden[0], hidden[1])  # different captions, different states
    assert encoder.config.vocab_size == len(tokenizer)


# The captions are handed over as JSON: a child that imported lightdiff.data for them would spend seconds on torch.
_BUILD = """
import hashlib, json, sys
from lightdiff.nets.text import build_caption_tokenizer
captions = json.loads(sys.argv[1])
tokenizer = build_caption_tokenizer(captions, vocab_size=300)
state = json.dumps([tokenizer.get_vocab(), tokenizer.tokenize("a zebra")], sort_keys=True)
print(hashlib.sha256(state.encode()).hexdigest())
"""

# The `tokenizers` trainer as lightdiff called it before: word-final symbols numbered in hash order.
_BUILD_UNRESERVED = """
import json, sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
captions = json.loads(sys.argv[1])
tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"], end_of_word_suffix="</w>",
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tokenizer.train_from_iterator(captions, trainer)
print(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])[:400])
"""

PROCESS_CAPTIONS = [label_to_caption(label) for label in range(NUM_CLASSES)] * 3 + ["a zebra", "two red squares"]


def _in_new_processes(script: str, count: int) -> set[str]:
    arguments = [sys.executable, "-c", script, json.dumps(PROCESS_CAPTIONS)]
    return {subprocess.run(arguments, capture_output=True, text=True, check=True).stdout for _ in range(count)}


def test_the_caption_tokenizer_is_the_same_in_every_process() -> None:
    """A run rebuilds its tokenizer at every start (and every DDP rank builds one): it must be a function of the
    captions alone, or a seed would not reproduce a run and ranks would not agree on token ids."""
    # this process and a new one (its hash seed differs): one vocabulary
    tokenizer = build_caption_tokenizer(PROCESS_CAPTIONS, vocab_size=300)
    state = json.dumps([tokenizer.get_vocab(), tokenizer.tokenize("a zebra")], sort_keys=True)
    assert _in_new_processes(_BUILD, 1) == {hashlib.sha256(state.encode()).hexdigest() + "\n"}
    # Negative control: the trainer left to number symbols itself gives another vocabulary in another process.
    assert len(_in_new_processes(_BUILD_UNRESERVED, 3)) > 1


def test_text_summary_is_clips_pooled_output_also_from_cached_states() -> None:
    """The discriminator's text condition is CLIP's pooled embedding (the end-of-text state), as ADD conditions it;
    cached states give the same vector. Negative control: the mean of the states, used before, differs."""
    from lightdiff.nets.families.sd import CLIPText

    tokenizer = build_caption_tokenizer(CAPTIONS, model_max_length=8)
    torch.manual_seed(0)
    family = CLIPText(tokenizer, text_encoder_from_scratch(tokenizer, 16, 1, 2), trainable=False).eval()
    prompts = ["a red circle", "a blue square", ""]
    with torch.no_grad():
        output = family.text_encoder(tokenize_prompts(tokenizer, prompts))
        condition = family({"text": prompts})
        cached = family({"text": prompts, "text_states": output.last_hidden_state})
    torch.testing.assert_close(condition.summary, output.pooler_output)
    torch.testing.assert_close(cached.summary, output.pooler_output)
    assert not torch.allclose(condition.summary, output.last_hidden_state.mean(dim=1))
