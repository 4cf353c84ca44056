"""The byte-level tokenizer shipped in ``recur.hf``: ids 0..255 are the bytes and 256 is BOS, as
recur's text task encodes a document; it saves and loads through ``AutoTokenizer`` offline, and
``pipeline("text-generation")`` generates with it what recur's own generate does."""

from __future__ import annotations

import pytest
import torch
from hf_util import make
from transformers import AutoTokenizer, pipeline

from recur import corpus
from recur.hf import BOS, byte_tokenizer

TEXTS = ["", "def f(x):\n    return x", "héllo wörld ✓ 你好", "\x00\x01\t\r\n \x7f\xa0\xad", "a <bos> b"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_a_text_is_bos_then_its_utf8_bytes_as_recur_encodes_it(tok, text):
    assert tok(text).input_ids == corpus.encode(text) == [BOS, *text.encode("utf-8")]
    assert tok(text, add_special_tokens=False).input_ids == list(text.encode("utf-8"))
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert byte_tokenizer(add_bos=False)(text).input_ids == list(text.encode("utf-8"))


def test_every_byte_is_its_own_id_and_decodes_as_recur_decodes(tok):
    assert [tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(b)) for b in range(256)] == list(range(256))
    assert len(tok) == corpus.VOCAB_SIZE == 257 and tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == BOS
    ids = [BOS, 0xFF, 104, 0xC3, 0xA9, BOS, 0xE2, 0x9C]  # invalid and cut UTF-8: U+FFFD, as recur shows it
    assert tok.decode(ids, skip_special_tokens=True) == corpus.decode(ids)


def test_it_saves_and_loads_through_auto_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in TEXTS:
        assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.padding_side == "left" and loaded.pad_token_id == BOS
    batch = loaded(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch.input_ids.tolist() == [[BOS, BOS, BOS, 97, 98], [BOS, 97, 98, 99, 100]]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def text_model():
    model = make("gla", vocab=257)
    model.generation_config.eos_token_id = None  # an untrained model: generate every token asked for
    return model


def test_pipeline_text_generation_generates_what_recur_does(tok, text_model):
    pipe = pipeline("text-generation", model=text_model, tokenizer=tok)
    prompt = "def "
    got = pipe(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    ids = text_model.lm.generate(torch.tensor([corpus.encode(prompt)]), 10)[0]
    assert got == tok.decode(ids, skip_special_tokens=True) and got.startswith(prompt)


def test_a_batched_pipeline_left_pads_and_gives_each_prompt_its_own_text(tok, text_model):
    pipe = pipeline("text-generation", model=text_model, tokenizer=tok)
    prompts = ["a", "import os\n", "class "]
    batched = pipe(prompts, max_new_tokens=8, do_sample=False, batch_size=3)
    alone = [pipe(p, max_new_tokens=8, do_sample=False) for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]
