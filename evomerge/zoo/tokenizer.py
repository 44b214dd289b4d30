"""Byte-level BPE tokenizer of the tiny zoo, trained locally on the task text.

Pre-tokenization isolates every character except runs of upper-case letters and then applies
GPT-2's byte-level mapping, so BPE merges only the upper-case task keywords (``REV``, ``SORT``,
...) while digits, letters and brackets of the data stay one token each: reversing, sorting or
adding then acts on single tokens. The post-processor prepends ``<s>`` to every encoded text, so
the model, our own scorer and lm-eval's ``HFLM`` (which calls the tokenizer with its default
``add_special_tokens=True``) all see the same ``<s> query answer`` token stream.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (256 bytes + 4 specials + merges) on ``texts``.

    Training stops early when no pair is left to merge, so the vocabulary can be smaller.

    Raises ValueError when ``vocab_size`` leaves no room for the byte alphabet and special tokens.
    """
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the byte alphabet + specials ({n_base})")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("[A-Z]+|[^A-Z]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="right"
    )
