"""A tiny random-init Hugging Face SigLIP for the tests (nothing downloaded): its config, random LayerNorm affines
and biases, and a folder written with ``save_pretrained`` (a sentencepiece tokenizer trained here, an image
processor). Used by tests/test_siglip.py and the demo_siglip.ipynb test."""
from __future__ import annotations

import io
from pathlib import Path

import torch
import transformers

from utils.text.classnames import OPENAI_IMAGENET_TEMPLATES, get_classnames

VOCAB, TEXT_LEN, D, HEADS = 300, 16, 32, 4
TEXTS = [f"a photo of {w}" for w in ("a dog", "a cat", "the sea", "a red car", "snow", "a tree", "a bird",
                                     "a house", "a city at night", "a bowl of fruit", "people", "a mountain")] + \
        [f"{a} {b}" for a in ("bright", "dark", "blurry", "small", "large") for b in ("object", "animal", "scene",
                                                                                     "texture", "pattern")]


def tiny_config(**vision) -> "transformers.SiglipConfig":
    """Two layers of width 32 in each tower, 4 heads, 32 x 32 images in 8 x 8 patches, texts of 16 tokens."""
    return transformers.SiglipConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_LEN, pad_token_id=1, eos_token_id=1,
                         bos_token_id=None),
        vision_config=dict(dict(image_size=32, patch_size=8, hidden_size=D, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=HEADS), **vision))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random LayerNorm affines (random init leaves them 1 and 0) and biases, and a random probe."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "probe" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_tiny_siglip(folder: Path) -> Path:
    """Write the tiny SigLIP (``SiglipModel``, ``SiglipTokenizer``, ``SiglipImageProcessor``) to ``folder``."""
    import sentencepiece as spm

    corpus = [t(c) for c in get_classnames("sample") for t in OPENAI_IMAGENET_TEMPLATES] + TEXTS
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model_file, vocab_size=120,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "spiece.model").write_bytes(model_file.getvalue())
    transformers.SiglipTokenizer(str(folder / "spiece.model"), model_max_length=TEXT_LEN).save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.manual_seed(0)
    randomize_(transformers.SiglipModel(tiny_config())).save_pretrained(folder)
    return folder
