"""Chat-template references for tests/integration/chat_templates.rs, rendered by transformers.

Writes tests/fixtures/chat_templates/:

  <style>.jinja     five templates in the styles HF models ship (ChatML; header tokens with
                    `trim` and a BOS; Zephyr's role tags ending turns with EOS; Gemma's role
                    renaming, `.strip()` and `raise_exception` on a system message or roles out of
                    turn; Mistral's [INST] with no generation prompt)
  tokenizer_config.json   the Zephyr-style template as a list of named templates, for `hf`
  reference.json    for each template and conversation: transformers' `apply_chat_template`
                    text and ids (GPT-2's tokenizer, tests/fixtures/tiny-gpt2), the assistant
                    mask from `return_assistant_tokens_mask` (computed on a copy of the template
                    with `{% generation %}` around each answer and its end-of-turn marker; both
                    copies render the same text, which is checked), the generation prompt after
                    one user message, and the error for conversations a template refuses

usage: python scripts/make_chat_template_reference.py
(needs transformers and jinja2; CI never runs it)
"""
import json
import os

from transformers import PreTrainedTokenizerFast

out = "tests/fixtures/chat_templates"
tok = PreTrainedTokenizerFast(
    tokenizer_file="tests/fixtures/tiny-gpt2/tokenizer.json", bos_token="<|endoftext|>", eos_token="<|endoftext|>"
)

# (plain, tagged): the tagged copy marks what the assistant-only loss trains on.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    ),
    "headers": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'].strip() + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'assistant' %}{{ '<start_of_turn>model\\n' }}{% generation %}{{ message['content'].strip() + '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}{% else %}{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'].strip() + '<end_of_turn>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
    ),
    "inst": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    ),
}

CONVERSATIONS = {
    "two_turns": [
        {"role": "user", "content": "What is the capital of Kenya?"},
        {"role": "assistant", "content": "Nairobi."},
        {"role": "user", "content": "And of Italy?\nJust the name."},
        {"role": "assistant", "content": " Rome, on the Tiber. "},
    ],
    "with_system": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a sea."},
        {"role": "assistant", "content": "The Baltic."},
    ],
}

reference = {}
for name, (plain, tagged) in TEMPLATES.items():
    with open(os.path.join(out, f"{name}.jinja"), "w") as f:
        f.write(plain)
    entry = {"conversations": {}}
    for conv_name, conv in CONVERSATIONS.items():
        try:
            text = tok.apply_chat_template(conv, chat_template=plain, tokenize=False)
        except Exception as e:  # the template refuses the conversation
            entry["conversations"][conv_name] = {"error": str(e)}
            continue
        tagged_text = tok.apply_chat_template(conv, chat_template=tagged, tokenize=False)
        assert text == tagged_text, (name, conv_name)
        enc = tok.apply_chat_template(
            conv, chat_template=tagged, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        entry["conversations"][conv_name] = {
            "text": text,
            "ids": list(enc["input_ids"]),
            "assistant_masks": list(enc["assistant_masks"]),
        }
    entry["generation_prompt"] = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], chat_template=plain, tokenize=False, add_generation_prompt=True
    )
    reference[name] = entry

with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(
        {
            "bos_token": {"content": "<|endoftext|>", "special": True},
            "eos_token": "<|endoftext|>",
            "chat_template": [{"name": "default", "template": TEMPLATES["zephyr"][0]}, {"name": "tool_use", "template": "unused"}],
        },
        f,
        indent=2,
    )
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump({"conversations": CONVERSATIONS, "templates": reference}, f, indent=1, ensure_ascii=False)
print("wrote", out)
