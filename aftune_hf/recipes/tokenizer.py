"""A byte-level tokenizer built in code: no download, identical everywhere.

Ids 0-255 are the bytes; then ``<pad>``, ``<s>``, ``</s>``. It is a real
``PreTrainedTokenizerFast`` (``tokenizers`` BPE with no merges over a byte-level alphabet),
so ``generate``, collators and ``save_pretrained`` work as with any Hub tokenizer.

Example:
    >>> tok = byte_tokenizer()
    >>> tok("hi")["input_ids"], tok.decode([104, 105])
    ([104, 105], 'hi')
"""

from __future__ import annotations

from functools import lru_cache

VOCAB_SIZE = 259
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """Printable stand-in character for each byte value (the GPT-2 byte-level mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def byte_tokenizer(padding_side: str = "right"):
    """Build the byte tokenizer (``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    vocab.update({PAD: 256, BOS: 257, EOS: 258})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side=padding_side
    )
