"""Check pipe's GGUF export against llama.cpp and record what CI compares without them.

For each test fixture family (GPT-2, Llama, Qwen2, Qwen3) and each quant (f32, f16, bf16, q8_0):
  1. `pipe export <fixture> --format gguf --quant Q`;
  2. llama.cpp's own converter (convert_hf_to_gguf.py, from the llama.cpp sources llama-cpp-python's
     sdist vendors) on the same folder: pipe's tensors must be byte-identical and its metadata equal
     (but for general.name and the converter's size label);
  3. llama.cpp itself (node-llama-cpp 3.21.1's prebuilt binaries, scripts/llama_cpp_reference.mjs)
     loads pipe's file: its tokenization of a few texts, the next-token log-probabilities after every
     position of those texts, and greedy continuations;
  4. tests/fixtures/gguf/<family>-<quant>.json: the file's metadata and each tensor's type, dims and
     SHA-256 (read by gguf-py's reader, not pipe's), and llama.cpp's outputs.

    python scripts/make_gguf_reference.py PIPE_BINARY LLAMA_CPP_SOURCES NODE_LLAMA_CPP_DIR

Needs: gguf, numpy, torch, transformers, tokenizers (the converter's imports); node.
"""
import hashlib, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from tokenizers import Tokenizer

PIPE, LLAMA_CPP, NODE_LLAMA_CPP = sys.argv[1:4]
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "gguf"
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3"]
QUANTS = ["f32", "f16", "bf16", "q8_0"]
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "Zürich, 2026: 3 apples and 12 pears!"]
GREEDY = 12

CONVERT = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import conversion.base as base
# pipe's fixtures have small tokenizers the converter's hash table does not list: the
# pre-tokenizer name is compared separately (pipe's choice must be what the test expects).
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: os.environ["PRE"]
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
"""


def read(path):
    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    tensors = [
        {"name": t.name, "type": t.tensor_type.name, "dims": [int(d) for d in t.shape],
         "sha256": hashlib.sha256(t.data.tobytes()).hexdigest()}
        for t in reader.tensors
    ]
    return meta, tensors


def summary(value):
    """Metadata as CI compares it: long arrays by their length and SHA-256 of their JSON."""
    if isinstance(value, list) and len(value) > 16:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return {"len": len(value), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return value


def main():
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp())
    worst = {}
    for family in FAMILIES:
        source = work / f"tiny-{family}"
        shutil.copytree(FIXTURES / f"tiny-{family}", source)
        config = json.loads((source / "config.json").read_text())
        if family == "gpt2":
            config["n_ctx"] = config["n_positions"]  # the converter reads GPT-2's context as n_ctx
            (source / "config.json").write_text(json.dumps(config))
        tok = Tokenizer.from_file(str(source / "tokenizer.json"))
        bos = tok.encode("", add_special_tokens=True).ids
        ids = [bos + tok.encode(text, add_special_tokens=False).ids for text in TEXTS]
        vocab = config["vocab_size"]
        # The log-probabilities of a spread of the vocabulary and of every id in the texts.
        keep = sorted(set(range(0, vocab, vocab // 64)) | {i for case in ids for i in case})
        cases = {"texts": TEXTS, "ids": ids, "greedy_tokens": GREEDY, "keep": keep}
        (work / "cases.json").write_text(json.dumps(cases))
        for quant in QUANTS:
            ours = work / f"{family}-{quant}.gguf"
            subprocess.run([PIPE, "export", str(FIXTURES / f"tiny-{family}"), "--format", "gguf", "--quant", quant,
                            "--out", str(ours)], check=True, stdout=subprocess.DEVNULL)
            meta, tensors = read(ours)
            theirs = work / f"{family}-{quant}-converter.gguf"
            subprocess.run([sys.executable, "-c", CONVERT, str(source), "--outtype", quant, "--outfile", str(theirs)],
                           cwd=LLAMA_CPP, env={**os.environ, "PRE": meta["tokenizer.ggml.pre"]}, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            their_meta, their_tensors = read(theirs)
            by_name = lambda ts: sorted(ts, key=lambda t: t["name"])  # the converter keeps safetensors' order
            assert by_name(tensors) == by_name(their_tensors), f"{family} {quant}: tensors differ from the converter's"
            cosmetic = {"general.name", "general.size_label", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token",
                        "tokenizer.ggml.add_bos_token", f"{meta['general.architecture']}.attention.key_length",
                        f"{meta['general.architecture']}.attention.value_length"}
            for key in (set(meta) | set(their_meta)) - cosmetic:
                assert meta.get(key) == their_meta.get(key), f"{family} {quant}: {key} {meta.get(key)} != {their_meta.get(key)}"
            llama = subprocess.run(["node", str(ROOT / "scripts" / "llama_cpp_reference.mjs"), str(ours), str(work / "cases.json")],
                                   env={**os.environ, "NODE_LLAMA_CPP": NODE_LLAMA_CPP}, check=True, capture_output=True, text=True)
            outputs = json.loads(llama.stdout)
            reference = {
                "made_by": "scripts/make_gguf_reference.py (llama.cpp through node-llama-cpp 3.21.1; gguf-py's reader)",
                "source": f"tests/fixtures/tiny-{family}", "quant": quant,
                "metadata": {k: summary(v) for k, v in meta.items()}, "tensors": tensors,
                "texts": TEXTS, "ids": ids, "keep": keep,
                "llama_cpp": {"tokenized": outputs["tokenized"], "logprobs": [[[round(v, 6) for v in row] for row in case] for case in outputs["logprobs"]], "greedy": outputs["greedy"]},
                "bytes": ours.stat().st_size,
            }
            (OUT / f"{family}-{quant}.json").write_text(json.dumps(reference, ensure_ascii=False, indent=None))
            print(f"{family:6} {quant:5} {ours.stat().st_size:>9} bytes: tensors and metadata as the converter writes them; llama.cpp greedy {outputs['greedy'][0][:6]}")
    shutil.rmtree(work)


main()
