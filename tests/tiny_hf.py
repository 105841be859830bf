"""Tiny Hugging Face models built in-process for the transformers runtime tests (nothing downloaded).

Three models with seeded random weights, saved with ``save_pretrained`` in a repository layout:

- ``classifier``: a 2-layer BERT sequence classifier (3 labels) with a WordPiece tokenizer;
- ``embedder``: a 2-layer BERT encoder (``BertModel``) with the same tokenizer;
- ``generator``: a ``LlamaForCausalLM`` (hidden 64, 2 layers, head size 32, vocab 512) with a
  byte-level BPE tokenizer.

``build_decoder_classifier`` makes a ``LlamaForSequenceClassification`` whose config names a
padding token other than its tokenizer's (decoder classifiers score the last token that is not it).

``build_sized_llama`` makes a random Llama of about a given size (for the memory manager's tests
and benchmarks), and ``link_model`` repeats a model folder under other names without copying.

Both tokenizers are trained by ``tokenizers`` on generated text. Weights are drawn with a larger
spread than the libraries' default (``initializer_range``) so that random models still give
clearly different answers to different texts (and greedy decoding has no near ties).
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a model server batch token text request answer queue memory device tensor shape cat dog "
    "river stone light green blue quick slow bright dark small large serve load run wait send "
    "read write every some many one two three four five six seven eight nine ten"
).split()

#: max_position_embeddings of the BERT models: small, so that "too long" is easy to reach
BERT_MAX_POSITIONS = 64
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def corpus(count: int = 2000, seed: int = 0) -> list[str]:
    """Generated sentences (real words and made-up ones) to train the tokenizers on."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    vocabulary = list(WORDS) + made_up
    return [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 14))) + rng.choice(".!?")
            for _ in range(count)]


def wordpiece_tokenizer():
    """A BERT-style tokenizer ([CLS] text [SEP], [PAD] = 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=BERT_MAX_POSITIONS,
    )


def byte_bpe_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with <s> (bos), </s> (eos) and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=256,
    )


def _bert_config(tokenizer, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=BERT_MAX_POSITIONS, initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )


def build_classifier(path: Path, seed: int = 1) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    tokenizer = wordpiece_tokenizer()
    config = _bert_config(tokenizer, num_labels=len(LABELS), id2label=dict(LABELS),
                          label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_embedder(path: Path, seed: int = 3) -> Path:
    import torch
    from transformers import BertModel

    tokenizer = wordpiece_tokenizer()
    torch.manual_seed(seed)
    model = BertModel(_bert_config(tokenizer)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: a ChatML-like template; it starts with the BOS token, as the tokenizer's own special tokens do
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_generator(path: Path, seed: int = 2, max_positions: int = 256, chat_template: bool = False) -> Path:
    """The tiny Llama; ``max_positions`` only sets the config's limit (rotary positions have no
    weights). ``chat_template`` puts ``CHAT_TEMPLATE`` inline in ``tokenizer_config.json`` (where
    every loader reads it; transformers 5 saves it to ``chat_template.jinja`` by itself)."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_positions,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if chat_template:
        config_path = path / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text())
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
        tokenizer_config["model_max_length"] = max_positions
        config_path.write_text(json.dumps(tokenizer_config, indent=2))
        (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def build_decoder_classifier(path: Path, config_pad_token_id: int, seed: int = 4) -> Path:
    """A tiny ``LlamaForSequenceClassification`` (3 labels) with the byte-level BPE tokenizer,
    whose config says ``config_pad_token_id`` is padding (its tokenizer pads with ``<pad>``)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = byte_bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=config_pad_token_id, num_labels=len(LABELS), id2label=dict(LABELS),
        label2id={v: k for k, v in LABELS.items()},
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_sized_llama(path: Path, mib: int, dtype: str = "float32", hidden: int = 1024,
                      max_positions: int = 256, never_eos: bool = False) -> int:
    """A random ``LlamaForCausalLM`` whose weights take about ``mib`` MiB in ``dtype`` (whole
    layers of width ``hidden``, at least one), saved with the byte-level BPE tokenizer; returns
    the bytes of its safetensors. ``never_eos`` zeroes the end-of-sequence row of the output
    layer, so greedy decoding never picks it and a generation runs to ``max_new_tokens``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_bpe_tokenizer()
    tokenizer.model_max_length = max_positions
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    intermediate = 3 * hidden
    per_layer = (4 * hidden * hidden + 3 * hidden * intermediate) * width
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=max(1, (mib * 2**20) // per_layer), num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, max_position_embeddings=max_positions, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if never_eos:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def link_model(source: Path, target: Path) -> Path:
    """``target`` as a folder of hard links to ``source``'s files (one checkpoint, many models)."""
    import os

    target.mkdir(parents=True)
    for file in source.iterdir():
        os.link(file, target / file.name)
    return target
