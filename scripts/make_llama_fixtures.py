"""Make tiny random models of the Llama family (Llama, Qwen2, Qwen3) in HuggingFace format,
with reference outputs from transformers, for pipe's fidelity tests.

Each folder (tests/fixtures/tiny-<family>) is what `save_pretrained` writes, exercising the
features of its family that a released checkpoint of it uses:

  tiny-llama  grouped-query attention (4 heads, 2 key/value heads), untied LM head, llama3
              rope scaling, attention and MLP biases; f32 weights
  tiny-qwen2  one key/value head, tied LM head, q/k/v biases, rope_theta 1e6; bf16 weights in
              two shards (model.safetensors.index.json)
  tiny-qwen3  q/k RMSNorm, an explicit head_dim wider than hidden_size / heads, untied head;
              f16 weights

beside a small byte-level BPE tokenizer trained here (tokenizer.json) with the special tokens
as each family's releases have them: tiny-llama's post-processor starts every text with `<s>`
and its EOS is `</s>`; tiny-qwen2's EOS is `<|im_end|>`, and its generation_config.json ends
generation at `<|im_end|>` or `<|endoftext|>`; tiny-qwen3's EOS is `<|endoftext|>`. Then what
transformers (eager attention, float32, CPU) computes on the weights as stored:

  reference.json  encoded texts, per-token NLL, top-5 ids of text 0, the right-padded batch's
                  loss, the prompt/response pairs' completion-only loss, greedy ids, and the
                  losses of five AdamW steps on the padded batch
  grads.safetensors  every parameter's gradient of the padded batch's loss at step 0

usage: make_llama_fixtures.py OUT_ROOT   (writes OUT_ROOT/tiny-llama, tiny-qwen2, tiny-qwen3)
"""
import json, os, sys
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

root = sys.argv[1]
CORPUS = [
    "Hello, I am a language model.",
    "The best reasons to study at Oxford university: full of culture and history.",
    "Rust makes systems programming safe, fast and fun to write.",
    "What is the capital of France? The capital of France is Paris.",
    "Name three primary colours. Red, yellow and blue.",
    "Once upon a time there was a small model that learned to speak.",
    "Two plus two is four, and four plus four is eight.",
] * 20
TEXTS = CORPUS[:3]
PAIRS = [["What is the capital of France?\n", "The capital of France is Paris."],
         ["Name three primary colours.\n", "Red, yellow and blue."]]
PROMPT = "Once upon a time"
EOS = "<|endoftext|>"
SPECIAL = [EOS, "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok

plain = make_tokenizer()
V = plain.get_vocab_size()
ID = {t: plain.token_to_id(t) for t in SPECIAL}

FAMILIES = {
    "tiny-llama": (LlamaForCausalLM, LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        torch.float32, None, {"bos": "<s>", "eos": "</s>", "stops": ["</s>", "<|im_end|>"]}),
    "tiny-qwen2": (Qwen2ForCausalLM, Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False),
        torch.bfloat16, "40KB", {"bos": None, "eos": "<|im_end|>", "stops": ["<|im_end|>", EOS]}),
    "tiny-qwen3": (Qwen3ForCausalLM, Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False),
        torch.float16, None, {"bos": None, "eos": EOS, "stops": [EOS]}),
}

def family_tokenizer(special):
    """The trained tokenizer, with a post-processor putting the BOS before every text where the
    family's tokenizers have one."""
    tok = Tokenizer.from_str(plain.to_str())
    if special["bos"]:
        bos = special["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ID[bos])])
    return tok

def lm_loss(model, ids_list, masks=None):
    """Right-pad a batch; padding (and masked prompt tokens) are ignored by the loss."""
    T = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), T), eos_id); att = torch.zeros((len(ids_list), T), dtype=torch.long)
    labels = torch.full((len(ids_list), T), -100)
    for i, x in enumerate(ids_list):
        ids[i, :len(x)] = torch.tensor(x); att[i, :len(x)] = 1
        lab = torch.tensor(x)
        if masks is not None:
            lab[:masks[i]] = -100
        labels[i, :len(x)] = lab
    return model(input_ids=ids, attention_mask=att, labels=labels).loss

for seed, (name, (cls, cfg, dtype, shard, special)) in enumerate(FAMILIES.items()):
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    tok = family_tokenizer(special)
    eos_id = ID[special["eos"]]
    enc = [tok.encode(t).ids for t in TEXTS]
    cfg.bos_token_id = ID[special["bos"]] if special["bos"] else None
    cfg.eos_token_id = eos_id; cfg.pad_token_id = None
    model = cls(cfg).float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.generation_config.bos_token_id = cfg.bos_token_id
    model.generation_config.eos_token_id = [ID[t] for t in special["stops"]]
    kwargs = {"max_shard_size": shard} if shard else {}
    model.to(dtype).save_pretrained(out, safe_serialization=True, **kwargs)
    tok.save(os.path.join(out, "tokenizer.json"), pretty=False)
    json.dump({"eos_token": special["eos"], "bos_token": special["bos"], "tokenizer_class": "PreTrainedTokenizerFast"},
              open(os.path.join(out, "tokenizer_config.json"), "w"), indent=1)

    # The reference is computed from the weights as stored, read back in float32.
    model = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ref = {"family": cfg.model_type, "texts": TEXTS, "encoded": enc, "pairs": PAIRS,
           "eos_id": eos_id, "bos_id": ID[special["bos"]] if special["bos"] else None,
           "stop_ids": [ID[t] for t in special["stops"]]}
    with torch.no_grad():
        ref["nll"], ref["loss"] = [], []
        for x in enc:
            logits = model(torch.tensor([x])).logits[0]
            lp = torch.log_softmax(logits[:-1], -1)
            nll = -lp[torch.arange(len(x) - 1), torch.tensor(x[1:])]
            ref["nll"].append([round(v, 7) for v in nll.tolist()])
            ref["loss"].append(round(nll.mean().item(), 7))
        ref["top5"] = model(torch.tensor([enc[0]])).logits[0].topk(5, -1).indices.tolist()
        ref["batch_loss"] = round(lm_loss(model, enc).item(), 7)
        pair_ids = [tok.encode(p + r).ids for p, r in PAIRS]
        prompt_lens = [len(tok.encode(p).ids) for p, _ in PAIRS]
        ref["pair_encoded"] = pair_ids; ref["pair_prompt_lens"] = prompt_lens
        ref["masked_loss"] = round(lm_loss(model, pair_ids, prompt_lens).item(), 7)
        prompt = tok.encode(PROMPT).ids
        gen = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=20, do_sample=False, pad_token_id=eos_id, eos_token_id=None)
        ref["greedy"] = {"prompt_ids": prompt, "new_ids": gen[0, len(prompt):].tolist()}

    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss = lm_loss(model, enc); loss.backward()
    grads = {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters()}
    save_file(grads, os.path.join(out, "grads.safetensors"))
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses = []
    for step in range(5):
        loss = lm_loss(model, enc); loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True); losses.append(round(loss.item(), 7))
    ref["adamw_losses"] = losses
    model.load_state_dict(init_state)
    json.dump(ref, open(os.path.join(out, "reference.json"), "w"), indent=1)
    print("wrote", out, "params", sum(q.numel() for q in model.parameters()))

# A PEFT LoRA adapter on tiny-llama (rank 4, alpha 8, every projection, random A and B so it
# changes the model), with what PEFT computes through it: tests/fixtures/tiny-llama-lora holds
# adapter_config.json, adapter_model.safetensors, reference.json (per-token NLL of each text)
# and grads.safetensors (each lora_A and lora_B gradient of the padded batch's loss).
from peft import LoraConfig, get_peft_model
out = os.path.join(root, "tiny-llama-lora")
base_dir = os.path.join(root, "tiny-llama")
torch.manual_seed(10)
base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.copy_(0.1 * torch.randn_like(p))
peft_model.save_pretrained(out)
os.remove(os.path.join(out, "README.md"))  # PEFT's model card
tok = Tokenizer.from_file(os.path.join(base_dir, "tokenizer.json"))
enc = [tok.encode(t).ids for t in TEXTS]
eos_id = json.load(open(os.path.join(base_dir, "reference.json")))["eos_id"]
peft_model.eval()
ref = {"encoded": enc, "nll": []}
with torch.no_grad():
    for x in enc:
        logits = peft_model(input_ids=torch.tensor([x])).logits[0]
        lp = torch.log_softmax(logits[:-1], -1)
        ref["nll"].append([round(v, 7) for v in (-lp[torch.arange(len(x) - 1), torch.tensor(x[1:])]).tolist()])
peft_model.train()
loss = lm_loss(peft_model, enc); loss.backward()
ref["batch_loss"] = round(loss.item(), 7)
grads = {n.replace(".default", ""): p.grad.detach().clone().contiguous()
         for n, p in peft_model.named_parameters() if p.grad is not None}
save_file(grads, os.path.join(out, "grads.safetensors"))
json.dump(ref, open(os.path.join(out, "reference.json"), "w"), indent=1)
print("wrote", out, "adapter tensors", len(grads))
