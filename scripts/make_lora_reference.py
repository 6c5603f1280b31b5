"""LoRA references for tests/integration/lora.rs, computed by HF PEFT on the tiny fixture.

Writes tests/fixtures/tiny-lora/:

  adapter_config.json,        a PEFT LoRA adapter on the tiny GPT-2 (rank 4, alpha 8, every
  adapter_model.safetensors   projection), saved by PeftModel.save_pretrained; lora_A keeps
                              PEFT's Kaiming-uniform initialisation and lora_B is drawn
                              N(0, 0.1²) so that the adapter changes the model
  reference.safetensors       for the fixture's first text: `logits` (every position, the
                              first 2048 vocabulary entries), `nll` (per token), and the
                              gradient of the mean NLL for every adapter tensor under its
                              PEFT name with a `grad.` prefix

usage: python scripts/make_lora_reference.py
(needs torch, transformers, peft, safetensors; CI never runs it)
"""
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

base_dir = "tests/fixtures/tiny-gpt2"
out = "tests/fixtures/tiny-lora"
ref = json.load(open(os.path.join(base_dir, "reference.json")))

torch.manual_seed(0)
base = GPT2LMHeadModel.from_pretrained(base_dir, torch_dtype=torch.float32)
config = LoraConfig(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    fan_in_fan_out=True,
    task_type="CAUSAL_LM",
)
model = get_peft_model(base, config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn_like(p) * 0.1)
model.save_pretrained(out)

model.eval()
ids = torch.tensor([ref["encoded"][0]])
logits = model(ids).logits[0]  # [seq, vocab]
nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
nll.mean().backward()
tensors = {"logits": logits[:, :2048].detach().contiguous(), "nll": nll.detach().contiguous()}
for name, p in model.named_parameters():
    if p.grad is not None:
        # PEFT's saved name: no adapter name in it.
        tensors["grad." + name.replace(".default", "")] = p.grad.contiguous()
save_file(tensors, os.path.join(out, "reference.safetensors"))
print(f"wrote {out}: {len(tensors) - 2} adapter gradients")
