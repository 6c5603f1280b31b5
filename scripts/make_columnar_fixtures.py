"""Columnar dataset fixtures, written by pyarrow and `datasets` as users' files are.

    python scripts/make_columnar_fixtures.py tests/fixtures/columnar

Each kind's records are written once as JSONL (what pipe already reads) and again in the
columnar shapes the hub ships: Parquet in each common compression and string type, several
row groups, a `datasets` save_to_disk folder (one split, and a DatasetDict of two), and a
downloaded dataset repo's layout (`data/<split>-0000N-of-0000M.parquet`). The tests read both
and require the same examples. Needs pyarrow and datasets; CI does not run this.
"""

import json
import shutil
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

out = Path(sys.argv[1])
if out.exists():
    shutil.rmtree(out)
out.mkdir(parents=True)


def pairs(n, start=0):
    # Unicode, an empty prompt, a long response, quotes: what the text columns must carry.
    rows = []
    for i in range(start, start + n):
        prompt = {0: "", 1: "Qu'est-ce que «Parquet» ? 漢字 🙂"}.get(i % 7, f"question {i}: what is {i} * 3?")
        response = f"answer {i}: {i * 3}" + (" and more" * 40 if i % 5 == 4 else "")
        rows.append({"prompt": prompt, "response": response, "id": i})
    return rows


def write_jsonl(path, rows, keys):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in keys if k in row}, ensure_ascii=False) + "\n")


train = pairs(20)
write_jsonl(out / "pairs.jsonl", train, ["prompt", "response"])
table = pa.table(
    {
        "id": pa.array([r["id"] for r in train], pa.int64()),
        "prompt": pa.array([r["prompt"] for r in train], pa.string()),
        "response": pa.array([r["response"] for r in train], pa.string()),
        # A column pipe does not read, of a type it could not read as text.
        "scores": pa.array([[float(r["id"]), 0.5] for r in train], pa.list_(pa.float32())),
    }
)
for compression in ["snappy", "zstd", "gzip", "lz4", "brotli", "none"]:
    pq.write_table(table, out / f"pairs-{compression}.parquet", compression=compression, row_group_size=6)
# Large strings, string views and dictionaries (pandas' categoricals) are text too.
pq.write_table(
    table.cast(
        pa.schema(
            [
                ("id", pa.int64()),
                ("prompt", pa.large_string()),
                ("response", pa.string_view()),
                ("scores", pa.list_(pa.float32())),
            ]
        )
    ),
    out / "pairs-large-and-view.parquet",
)
pq.write_table(
    table.set_column(1, "prompt", pa.compute.dictionary_encode(table["prompt"])),
    out / "pairs-dictionary.parquet",
)
# A null response, and a prompt column of numbers: the errors' cases.
pq.write_table(
    pa.table({"prompt": ["a", "b"], "response": pa.array(["x", None], pa.string())}), out / "null-response.parquet"
)
pq.write_table(pa.table({"prompt": pa.array([1, 2], pa.int64()), "response": ["x", "y"]}), out / "int-prompt.parquet")

# Arrow IPC in its file format (`ARROW1` at both ends: pyarrow's `.arrow`, Feather v2), with
# several record batches.
import pyarrow.feather as feather

feather.write_feather(table, out / "pairs.feather", compression="uncompressed", chunksize=7)
# Feather's default compression is lz4; zstd is the other one pyarrow writes.
feather.write_feather(table, out / "pairs-lz4.feather", chunksize=7)
feather.write_feather(table, out / "pairs-zstd.arrow", compression="zstd", chunksize=7)

alpaca = [
    {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"{i}, {i + 1}", "output": str(2 * i + 1)}
    for i in range(9)
]
write_jsonl(out / "alpaca.jsonl", alpaca, ["instruction", "input", "output"])
pq.write_table(pa.Table.from_pylist(alpaca), out / "alpaca.parquet")

chats = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": str(2 * i)},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": str(4 * i)},
    ][: 3 if i % 2 else 5]
    for i in range(8)
]
write_jsonl(out / "chat.jsonl", [{"messages": m} for m in chats], ["messages"])
pq.write_table(pa.Table.from_pylist([{"messages": m, "source": "synthetic"} for m in chats]), out / "chat.parquet")
large_chat = pa.Table.from_pylist([{"messages": m} for m in chats])
large_chat = large_chat.cast(pa.schema([("messages", pa.large_list(large_chat.schema.field("messages").type.value_type))]))
pq.write_table(large_chat, out / "chat-large-list.parquet")
sharegpt_role = {"system": "system", "user": "human", "assistant": "gpt"}
sharegpt = [[{"from": sharegpt_role[t["role"]], "value": t["content"]} for t in m] for m in chats]
pq.write_table(
    pa.Table.from_pylist([{"conversations": c} for c in sharegpt]),
    out / "sharegpt.parquet",
)

texts = [{"text": f"Document {i}. " + "Some words follow. " * (i % 4 + 1)} for i in range(10)]
write_jsonl(out / "text.jsonl", texts, ["text"])
pq.write_table(pa.Table.from_pylist(texts), out / "text.parquet")

# `datasets`' save_to_disk: one split (Arrow stream files, dataset_info.json, state.json) and a
# DatasetDict (dataset_dict.json and a folder per split).
train_rows = [{"prompt": r["prompt"], "response": r["response"]} for r in train]
test_rows = [{"prompt": r["prompt"], "response": r["response"]} for r in pairs(4, start=100)]
write_jsonl(out / "pairs-test.jsonl", test_rows, ["prompt", "response"])
datasets.Dataset.from_list(train_rows).save_to_disk(str(out / "saved-dataset"), num_shards=2)
datasets.DatasetDict(
    {"train": datasets.Dataset.from_list(train_rows), "test": datasets.Dataset.from_list(test_rows)}
).save_to_disk(str(out / "saved-dataset-dict"))

# A downloaded dataset repo: data/<split>-0000N-of-0000M.parquet, the train split in two shards.
repo = out / "hub-repo" / "data"
repo.mkdir(parents=True)
pq.write_table(pa.Table.from_pylist(train_rows[:12]), repo / "train-00000-of-00002.parquet")
pq.write_table(pa.Table.from_pylist(train_rows[12:]), repo / "train-00001-of-00002.parquet")
pq.write_table(pa.Table.from_pylist(test_rows), repo / "test-00000-of-00001.parquet")
(out / "hub-repo" / "README.md").write_text("---\nlicense: cc0-1.0\n---\nA test dataset.\n")
print(f"wrote {sum(1 for _ in out.rglob('*') if _.is_file())} files under {out}")
