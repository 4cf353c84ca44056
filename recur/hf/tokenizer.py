"""``byte_tokenizer()``: the tokenizer of recur's text models, as a Hugging Face fast tokenizer.

    tok = byte_tokenizer()
    tok("héllo").input_ids          # [256, 104, 195, 169, 108, 108, 111]: BOS, then the UTF-8 bytes
    tok.decode(ids, skip_special_tokens=True)
    tok.save_pretrained("out"); AutoTokenizer.from_pretrained("out")   # no recur needed to load it

Ids 0..255 are the bytes themselves and 256 is BOS, the token before every document
(``recur.corpus``: ``BOS = 256``, ``VOCAB_SIZE = 257``), so a text is encoded exactly as recur's
text task encodes a prompt: BOS followed by its UTF-8 bytes. It is built here, offline, from
``tokenizers`` parts: the byte-level pre-tokenizer (each byte as one printable character, GPT-2's
reversible map; no splitting on spaces), a vocabulary mapping each such character to its byte
value, no merges, and BOS added in front by the post-processor. Every text is its bytes, even one
that spells ``<bos>``. Decoding maps the characters back to bytes and reads them as UTF-8 (an
invalid sequence shows as U+FFFD).

BOS is also the eos token (a recur text model ends a document by starting the next one) and the
pad token. Padding is on the left, as batched generation needs; pad positions never reach a
recur model's state (``RecurForCausalLM`` resets each row at its first real token). pad = eos
also keeps ``generate`` from guessing a mask from pad ids, which would take a prompt's leading
BOS for padding.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS = 256  # recur.corpus.BOS
BOS_TEXT = "<bos>"


def byte_characters() -> dict[int, str]:
    """The printable character that stands for each byte (GPT-2's byte-level map): bytes that are
    printable, non-space Latin-1 characters stand for themselves; the 68 others (controls, space,
    DEL, NBSP, soft hyphen) take the characters from U+0100 on, in byte order. The byte-level
    pre-tokenizer of ``tokenizers`` uses this same map."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    out, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            out[byte] = chr(byte)
        else:
            out[byte] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """recur's byte-level tokenizer (ids 0..255 bytes, 256 BOS); ``add_bos``: put BOS before each text."""
    vocab = {char: byte for byte, char in byte_characters().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BOS_TEXT, special=True, normalized=False)])
    if backend.token_to_id(BOS_TEXT) != BOS:
        raise RuntimeError(f"the byte tokenizer put {BOS_TEXT} at id {backend.token_to_id(BOS_TEXT)}, not {BOS}")
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TEXT} $A", pair=f"{BOS_TEXT} $A {BOS_TEXT} $B", special_tokens=[(BOS_TEXT, BOS)])
    # split_special_tokens: the text "<bos>" in an input is its five bytes, as recur encodes it;
    # BOS itself comes only from the post-processor (or an id).
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS_TEXT, eos_token=BOS_TEXT,
                                   pad_token=BOS_TEXT, padding_side="left", split_special_tokens=True,
                                   model_input_names=["input_ids", "attention_mask"])
