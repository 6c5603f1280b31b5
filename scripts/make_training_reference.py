"""Training references for tests/integration/fidelity.rs, computed by transformers on the tiny fixture.

Writes into the fixture folder (default tests/fixtures/tiny-gpt2):

  grads.safetensors        the gradient of every parameter at step 0, under its state-dict
                           name, for the fixture's texts right-padded into one batch (the
                           loss reference.json calls batch_loss); the LM head is tied to wte
                           and not listed
  training_reference.json  losses, pre-clip global gradient norms and learning rates over
                           eight AdamW steps on that batch, with linear warmup, cosine decay
                           to a floor and global-norm clipping

The schedule is pipe's, written out here from its definition (README, optimizer section):
warmup lr·(s+1)/W for steps s < W, then min + (lr − min)·(1 + cos(π·p))/2 with
p = (s − W)/(N − W); clipping is torch.nn.utils.clip_grad_norm_.

usage: python scripts/make_training_reference.py [FIXTURE_DIR]
(needs torch, transformers, safetensors; CI never runs it)
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

fixture = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny-gpt2"
ref = json.load(open(os.path.join(fixture, "reference.json")))
model = GPT2LMHeadModel.from_pretrained(fixture).float()
model.train()  # the fixture's dropout probabilities are 0


def batch_loss(ids_list):
    """Mean next-token loss of the texts right-padded into one batch, padding ignored."""
    longest = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), longest), 50256)
    attention = torch.zeros((len(ids_list), longest), dtype=torch.long)
    labels = torch.full((len(ids_list), longest), -100)
    for i, x in enumerate(ids_list):
        ids[i, : len(x)] = torch.tensor(x)
        attention[i, : len(x)] = 1
        labels[i, : len(x)] = torch.tensor(x)
    return model(input_ids=ids, attention_mask=attention, labels=labels).loss


encoded = ref["encoded"]
initial = {k: v.clone() for k, v in model.state_dict().items()}

loss = batch_loss(encoded)
loss.backward()
grads = {name: p.grad.detach().clone().contiguous() for name, p in model.named_parameters() if p.grad is not None}
save_file(grads, os.path.join(fixture, "grads.safetensors"), metadata={"format": "pt"})
model.zero_grad(set_to_none=True)

lr, warmup, total, min_ratio, clip = 1e-3, 2, 8, 0.1, 2.5


def lr_at(step):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    floor = lr * min_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


model.load_state_dict(initial)
opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
losses, norms, lrs = [], [], []
for step in range(total):
    for group in opt.param_groups:
        group["lr"] = lr_at(step)
    loss = batch_loss(encoded)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(round(loss.item(), 6))
    norms.append(round(norm.item(), 6))
    lrs.append(lr_at(step))

out = {
    "about": "AdamW on the texts right-padded, with warmup, cosine decay and clipping; "
    "see scripts/make_training_reference.py",
    "torch": torch.__version__,
    "optimizer": {"name": "adamw", "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                  "schedule": "cosine", "warmup_steps": warmup, "min_lr_ratio": min_ratio, "grad_clip": clip},
    "steps": total,
    "lrs": lrs,
    "losses_before_each_step": losses,
    "grad_norms_before_clipping": norms,
}
json.dump(out, open(os.path.join(fixture, "training_reference.json"), "w"), indent=1)
print("wrote grads.safetensors and training_reference.json to", fixture)
