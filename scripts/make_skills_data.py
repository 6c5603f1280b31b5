#!/usr/bin/env python3
"""Writes the default pipeline's synthetic data: data/skills.jsonl and data/skills-val.jsonl.

Prompt/response pairs of skills a small model trained from scratch can learn in a minute:
reordering and reformatting what the prompt holds (reversing words, lists, dates, JSON),
mapping words to their capitals, unit conversions to a thousand times the unit, and counting words. Every pair is made from a fixed seed; the held-out file holds prompts
whose exact content never appears in training (new word orders and combinations, new dates,
new numbers), so answering them right means the skill was learned, not the pair remembered.

    python3 scripts/make_skills_data.py            # rewrites both files (standard library only)
"""

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger lemon piano forest candle rocket garden silver "
    "window dragon pepper marble island copper violet shadow mirror thunder meadow "
    "falcon harbor winter summer orange basket needle planet canyon button rabbit"
).split()
NAMES = "Ann Ben Cara Dan Eva Finn Gia Hugo Ida Jon Kai Lea Max Nia Oto Pia".split()
UNITS = [
    ("km", "meters", "m"),
    ("kg", "grams", "g"),
    ("liters", "milliliters", "ml"),
    ("kW", "watts", "W"),
    ("seconds", "milliseconds", "ms"),
]


def reverse_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def make_list(rng):
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Make a list of: {', '.join(words)}", "\n".join(f"- {w}" for w in words)


def uppercase(rng):
    words = rng.sample(WORDS, rng.randint(2, 3))
    return f"Uppercase: {' '.join(words)}", " ".join(w.upper() for w in words)


def date(rng):
    year, month, day = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    return f"Write {year}-{month:02}-{day:02} as day/month/year.", f"{day:02}/{month:02}/{year}"


def as_json(rng):
    name, age = rng.choice(NAMES), rng.randint(18, 89)
    return f"As JSON: name {name}, age {age}", json.dumps({"name": name, "age": age})


def convert(rng):
    amount = rng.randint(2, 99)
    unit, into, symbol = rng.choice(UNITS)
    # Thousands grouped by a space, as the SI writes them.
    return f"Convert {amount} {unit} to {into}.", f"{amount} 000 {symbol}"


def count(rng):
    words = rng.sample(WORDS, rng.randint(2, 7))
    return f"How many words: {' '.join(words)}", str(len(words))


SKILLS = [reverse_words, make_list, uppercase, date, as_json, convert, count]


def main():
    rng = random.Random(20261205)
    root = Path(__file__).resolve().parent.parent / "data"
    seen, train, held_out = set(), [], []
    # Held-out prompts first (as many of each skill), then training prompts that differ.
    for wanted, out in ((6, held_out), (300, train)):
        for skill in SKILLS:
            made = 0
            while made < wanted:
                prompt, response = skill(rng)
                if prompt in seen:
                    continue
                seen.add(prompt)
                out.append({"prompt": prompt, "response": response})
                made += 1
    rng.shuffle(train)
    rng.shuffle(held_out)
    for name, rows in (("skills.jsonl", train), ("skills-val.jsonl", held_out)):
        with open(root / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
