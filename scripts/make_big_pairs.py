"""Many generated prompt/response pairs as one Parquet file, for measuring pipe's memory and
time on a large dataset (docs/data.md). Seeded, so the file is the same on every machine.

    python scripts/make_big_pairs.py 2000000 /tmp/big/pairs.parquet

Words are drawn from a fixed list of common English words: a prompt of 8 to 24, a response of
20 to 80 (about 390 bytes of text a pair), written in row groups of 100,000 rows, snappy
compressed, as `datasets`' to_parquet writes them. Needs pyarrow and numpy; CI does not run this.
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = (
    "the of and to in is was for on that with as by at from his her they which this be are "
    "have had one all were we when your can said there use an each she do how their if will up "
    "other about out many then them these so some would make like him into time has look two "
    "more write go see number no way could people my than first water been call who oil its now "
    "find long down day did get come made may part over new sound take only little work know "
    "place year live me back give most very after thing our just name good sentence man think "
    "say great where help through much before line right too mean old any same tell boy follow "
    "came want show also around form three small set put end does another well large must big "
    "even such because turn here why ask went men read need land different home us move try kind "
    "hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should america world high every near add food between own "
    "below country plant last school father keep tree never start city earth eye light thought "
    "head under story saw left few while along might close something seem next hard open example "
    "begin life always those both paper together got group often run important until children "
    "side feet car mile night walk white sea began grow took river four carry state once book hear"
).split()

count, out = int(sys.argv[1]), Path(sys.argv[2])
out.parent.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(20261205)
words = np.array(WORDS, dtype=object)
schema = pa.schema([("prompt", pa.string()), ("response", pa.string())])
group = 100_000
with pq.ParquetWriter(out, schema, compression="snappy") as writer:
    for start in range(0, count, group):
        n = min(group, count - start)
        prompts = [" ".join(words[rng.integers(0, len(words), k)]) + "?" for k in rng.integers(8, 25, n)]
        responses = [" ".join(words[rng.integers(0, len(words), k)]) + "." for k in rng.integers(20, 81, n)]
        writer.write_table(pa.table({"prompt": prompts, "response": responses}, schema=schema))
print(f"wrote {count} pairs to {out} ({out.stat().st_size / 1e6:.0f} MB)")
