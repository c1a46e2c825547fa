"""Trains the demo's byte-level BPE tokenizer and wraps it as a Hugging Face fast tokenizer.

Byte-level BPE maps every byte to a symbol before merging, so any text (tabs, newlines, any Unicode) encodes and
decodes back exactly. This module does not build the corpus or train models.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
NUM_BYTE_SYMBOLS = 256


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | None = None,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` entries (special tokens included) on `texts`.

    Special tokens: `<s>` (id 0, bos), `</s>` (id 1, eos), `<pad>` (id 2). `tokenizer(text)` prepends `<s>`;
    `add_special_tokens=False` leaves it out. Padding is on the left, as generation batches need. Saved with
    `save_pretrained(out_dir)` when `out_dir` is given.
    """
    min_vocab_size = NUM_BYTE_SYMBOLS + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab_size:
        raise ValueError(
            f"vocab_size must be at least {min_vocab_size} (bytes + special tokens), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would be invented at encode time and break exact round trips.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=model_max_length,
        # Clean-up would drop spaces before punctuation and break exact round trips of code.
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
