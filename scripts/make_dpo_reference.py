"""DPO reference for tests/integration/dpo.rs, computed by TRL's DPOTrainer on the tiny GPT-2 fixture.

The policy is the fixture model; the reference is the same model with every parameter moved
by seeded noise (so that log-ratios and rewards are not all zero). For six preference pairs
(one whose prompt's last token merges with its completion's first, one whose chosen completion
already ends with EOS, one longer than max_length, one with non-ASCII text) it writes, into
tests/fixtures/dpo/:

  reference.json     the pairs as text; TRL's tokenization of each (prompt_ids, chosen_ids,
                     rejected_ids after its common-prefix split) and the collated sequences
                     after keep_end truncation to max_length; the policy's and the reference's
                     summed completion log-probabilities per pair; and per loss type (sigmoid,
                     ipo, hinge, robust) the batch loss and TRL's logged figures
                     and two conversational pairs (TRL's format: lists of messages) as TRL
                     lays them out with ChatML and tokenizes them
  pairs.parquet      the six pairs as a Parquet file
  grads.safetensors  every parameter's gradient at step 0 for each loss type, named
                     "<loss>/<parameter>"; the tied embedding's (dense, vocabulary-sized)
                     only for sigmoid

The batch holds all pairs: TRL's loss is the mean over pairs.

usage: python scripts/make_dpo_reference.py [FIXTURE_DIR] [OUT_DIR]
(needs torch, transformers, trl 1.16, datasets, safetensors; CI never runs it)
"""
import json
import os
import sys
import tempfile

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoTokenizer, GPT2LMHeadModel
from trl import DPOConfig, DPOTrainer

fixture = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny-gpt2"
out = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/dpo"
os.makedirs(out, exist_ok=True)

MAX_LENGTH = 40
BETA = 0.1
SMOOTHING = 0.2
PAIRS = [
    {"prompt": "Question: What is the capital of France?\nAnswer:", "chosen": " Paris.", "rejected": " London, obviously."},
    {"prompt": "Translate to French: cat\n", "chosen": "chat", "rejected": "chien, I think"},
    # The prompt's trailing space merges with the completion's first word.
    {"prompt": "Say hello: ", "chosen": "hello there", "rejected": "goodbye"},
    {"prompt": "Count to three:", "chosen": " one two three<|endoftext|>", "rejected": " one three two"},
    {
        "prompt": "Summarise: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 5) + "\nSummary:",
        "chosen": " a fox jumps over a dog, five times",
        "rejected": " nothing",
    },
    {"prompt": "Uppercase: é漢 straße\n", "chosen": "É漢 STRASSE", "rejected": "é漢 straße"},
]

tok = AutoTokenizer.from_pretrained(fixture)
policy = GPT2LMHeadModel.from_pretrained(fixture).float()
reference = GPT2LMHeadModel.from_pretrained(fixture).float()
generator = torch.Generator().manual_seed(7)
with torch.no_grad():
    for p in reference.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=generator))
policy.train()  # the fixture's dropout probabilities are 0
reference.eval()

result = {"max_length": MAX_LENGTH, "beta": BETA, "label_smoothing": SMOOTHING, "pairs": PAIRS, "losses": {}}
grads = {}
for loss_type in ["sigmoid", "ipo", "hinge", "robust"]:
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp,
            beta=BETA,
            loss_type=[loss_type],
            label_smoothing=SMOOTHING if loss_type == "robust" else 0.0,
            max_length=MAX_LENGTH,
            truncation_mode="keep_end",
            per_device_train_batch_size=len(PAIRS),
            report_to=[],
            use_cpu=True,
            bf16=False,  # DPOConfig's default is bf16 autocast; the reference is float32
        )
        trainer = DPOTrainer(
            model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tok
        )
        examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
        batch = trainer.data_collator(examples)
        if "tokenized" not in result:
            result["tokenized"] = [
                {k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples
            ]
            n = len(PAIRS)
            ids, mask, attn = batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
            result["sequences"] = [
                {
                    "ids": ids[i][attn[i].bool()].tolist(),
                    "completion": mask[i][attn[i].bool()].tolist(),
                }
                for i in range(2 * n)
            ]
            with torch.no_grad():
                c, r = trainer.compute_ref_log_probs(reference, batch)
                result["reference_logps"] = [[a, b] for a, b in zip(c.tolist(), r.tolist())]
                c, r = trainer.compute_ref_log_probs(policy, batch)
                result["policy_logps"] = [[a, b] for a, b in zip(c.tolist(), r.tolist())]
        policy.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(policy, batch)
        loss.backward()
        figures = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
        result["losses"][loss_type] = {"loss": loss.item(), "figures": figures}
        for name, p in policy.named_parameters():
            if name == "transformer.wte.weight" and loss_type != "sigmoid":
                continue
            grads[f"{loss_type}/{name}"] = p.grad.detach().clone().contiguous()

# TRL's conversational format, laid out by ChatML (tests/fixtures/chat_templates/chatml.jinja):
# the prompt's turns (a system turn in one), then the chosen and the rejected assistant turns.
CONVERSATIONS = [
    {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "London, obviously."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Opposite of hot?"},
        ],
        "chosen": [{"role": "assistant", "content": "cold"}],
        "rejected": [{"role": "assistant", "content": "It is cold, I believe."}],
    },
]
chat_tok = AutoTokenizer.from_pretrained(fixture)
chat_tok.chat_template = open(os.path.join(os.path.dirname(fixture), "chat_templates", "chatml.jinja")).read()
with tempfile.TemporaryDirectory() as tmp:
    args = DPOConfig(output_dir=tmp, max_length=MAX_LENGTH, truncation_mode="keep_end", report_to=[], use_cpu=True, bf16=False)
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(CONVERSATIONS), processing_class=chat_tok
    )
    examples = [trainer.train_dataset[i] for i in range(len(CONVERSATIONS))]
    batch = trainer.data_collator(examples)
    ids, mask, attn = batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
    result["conversational"] = {
        "pairs": CONVERSATIONS,
        "sequences": [
            {"ids": ids[i][attn[i].bool()].tolist(), "completion": mask[i][attn[i].bool()].tolist()}
            for i in range(2 * len(CONVERSATIONS))
        ],
    }

json.dump(result, open(os.path.join(out, "reference.json"), "w"), indent=1, ensure_ascii=False)
# The same pairs as Parquet (snappy), for the test that every file kind holds pairs.
import pyarrow as pa
import pyarrow.parquet as pq

pq.write_table(pa.Table.from_pylist(PAIRS), os.path.join(out, "pairs.parquet"))
save_file(grads, os.path.join(out, "grads.safetensors"), metadata={"format": "pt"})
print(json.dumps(result["losses"], indent=1))
