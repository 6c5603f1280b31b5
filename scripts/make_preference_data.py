"""Make the shipped preference pairs from the shipped skills pairs: each prompt with its
reference answer as the chosen completion and a near miss as the rejected one — the answer
with two of its words swapped, or cut short when it has one word — the kind of mistake the
SFT model makes. Deterministic (seeded).

    python scripts/make_preference_data.py data/skills.jsonl data/skills-prefs.jsonl 600
"""

import json
import random
import sys


def near_miss(answer: str, rng: random.Random) -> str:
    words = answer.split(" ")
    if len(words) >= 2:
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
        missed = " ".join(words)
        if missed != answer:
            return missed
    return answer[: max(1, len(answer) // 2)]


def main() -> None:
    source, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(7)
    pairs = [json.loads(line) for line in open(source, encoding="utf-8") if line.strip()]
    rng.shuffle(pairs)
    with open(target, "w", encoding="utf-8") as out:
        for pair in pairs[:count]:
            rejected = near_miss(pair["response"], rng)
            if rejected == pair["response"]:
                continue
            record = {"prompt": pair["prompt"], "chosen": pair["response"], "rejected": rejected}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
