#!/usr/bin/env bash
# DPO speed and held-out loss against TRL's DPOTrainer, same model, data and settings, in one
# sitting (docs/dpo.md reports the figures):
#   1. the default SFT (pipelines/sft.toml), exported as a HuggingFace folder: the start model;
#   2. the shipped preference pairs split into 459 training and 51 held-out pairs, prompts laid
#      out as pipelines/dpo.toml lays them out ("{prompt}\n");
#   3. pipe's dpo stage alone from that model, and TRL's DPOTrainer in float32 and in bf16
#      autocast, each with pipelines/dpo.toml's DPO settings (2 epochs, 16 pairs a step,
#      lr 2e-4, AdamW betas 0.9/0.95, weight decay 0.01, 20 warmup steps then cosine to 0.1×,
#      clipping at 1.0, beta 0.1, sigmoid loss, max_length 128 keep_end).
# usage: scripts/dpo-vs-trl.sh [PYTHON]   (PYTHON with torch, transformers, trl; default python3)
#        PRECISIONS=f32 scripts/dpo-vs-trl.sh ...   runs TRL in float32 only
# Needs `cargo build --release` first. Writes only under a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
pipe=$PWD/target/release/pipe
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$pipe" run pipelines/sft.toml --set run.runs_dir="$tmp/runs" --set 'run.stages=["train"]' > /dev/null 2>&1
"$pipe" export sft-demo --runs-dir "$tmp/runs" --out "$tmp/sft-model" > /dev/null

"$python" - "$tmp" <<'EOF'
import json, sys
tmp = sys.argv[1]
pairs = [json.loads(l) for l in open("data/skills-prefs.jsonl")]
for p in pairs:
    p["prompt"] += "\n"
for name, part in [("train", pairs[:459]), ("val", pairs[459:])]:
    with open(f"{tmp}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in part)
EOF

cat > "$tmp/dpo.toml" <<EOF
[run]
name = "dpo-speed"
seed = 42
runs_dir = "$tmp/runs"
stages = ["dpo"]

[data]
prompt_template = "{prompt}"

[model]
path = "$tmp/sft-model"

[optimizer]
name = "adamw"
lr = 2e-4
betas = [0.9, 0.95]
weight_decay = 0.01
grad_clip = 1.0
schedule = "cosine"
warmup_steps = 20
min_lr_ratio = 0.1

[train]
batch_size = 16
checkpoint_every = 0

[dpo]
path = "$tmp/train.jsonl"
val_path = "$tmp/val.jsonl"
beta = 0.1
epochs = 2
max_length = 128
EOF
start=$(date +%s.%N)
"$pipe" run "$tmp/dpo.toml" > "$tmp/pipe.log" 2>&1
end=$(date +%s.%N)
run=$(ls -d "$tmp"/runs/dpo-speed/*)
pipe_val=$(grep '"stage":"dpo"' "$run/metrics.jsonl" | grep -v '"lr"' | tail -1)
pipe_train=$(grep '"stage":"dpo"' "$run/metrics.jsonl" | grep '"lr"' | tail -1 | sed 's/.*"elapsed_s":\([0-9.]*\).*/\1/')
# The reference's scoring, which TRL does inside each step, from the log's timestamps.
reference=$("$python" - "$tmp/pipe.log" <<'EOF'
import datetime, re, sys
at = {}
for line in open(sys.argv[1]):
    found = re.match(r"(\S+)Z\s+INFO (scoring the pairs|training examples)", line)
    if found:
        at[found.group(2)] = datetime.datetime.fromisoformat(found.group(1))
print(f"{(at['training examples'] - at['scoring the pairs']).total_seconds():.2f}")
EOF
)
echo "pipe: $(echo "$end - $start" | bc) s for the whole command (load, tokenize, reference, train, save); ${pipe_train} s training to the last step, after ${reference} s scoring the pairs with the reference; last held-out record: $pipe_val"

for precision in ${PRECISIONS:-f32 bf16}; do
"$python" - "$tmp" "$precision" <<'EOF'
import sys, time, tempfile, json
tmp, precision = sys.argv[1], sys.argv[2]
start = time.time()
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
model = AutoModelForCausalLM.from_pretrained(f"{tmp}/sft-model", dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(f"{tmp}/sft-model")
data = load_dataset("json", data_files={"train": f"{tmp}/train.jsonl", "val": f"{tmp}/val.jsonl"})
with tempfile.TemporaryDirectory() as out:
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=16, per_device_eval_batch_size=16, num_train_epochs=2,
        learning_rate=2e-4, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=20, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.01, max_grad_norm=1.0,
        beta=0.1, loss_type=["sigmoid"], max_length=128, truncation_mode="keep_end", eval_strategy="epoch",
        save_strategy="no", logging_steps=10, report_to=[], use_cpu=True, bf16=(precision == "bf16"),
        gradient_checkpointing=False, seed=42, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["val"], processing_class=tok)
    ready = time.time()
    result = trainer.train()
    done = time.time()
evals = [l for l in trainer.state.log_history if "eval_loss" in l]
print(f"TRL {precision}: {done - start:.1f} s for the whole script ({done - ready:.1f} s in train(): "
      f"{result.metrics['train_runtime']:.1f} s train_runtime); held-out: "
      + json.dumps({k: round(v, 4) for k, v in evals[-1].items() if k.startswith('eval_') and ('loss' in k or 'rewards' in k)}))
EOF
done
lscpu | grep 'Model name'
