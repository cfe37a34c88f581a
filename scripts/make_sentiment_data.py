"""Write the project's controlled-sentiment prompt set: data/sentiment/{train,heldout}.jsonl.

Prompts ask for a description of an everyday situation, neutral or unpleasant ("Describe a
traffic jam.", "What is it like to wait at the dentist?"), in several phrasings. Held-out prompts
describe situations that the training prompts never name. Each row:
{"id", "prompt", "situation", "topic"}; `topic` holds the situation's content words (lowercase
word stems), which `optune_jax.text_checks.on_topic` looks for in an answer. Deterministic for a
given seed: re-running it rewrites the files byte for byte.
Usage: python scripts/make_sentiment_data.py [--out-dir data/sentiment] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (noun phrase, topic stems): what the answer should be about. A stem matches a word that starts
# with it ("commut" matches "commuting"), so stems are kept long enough to be specific.
TRAIN_SITUATIONS = [
    ("a traffic jam", ["traffic", "jam", "car"]),
    ("a rainy Monday", ["rain", "monday"]),
    ("a delayed train", ["train", "delay"]),
    ("a long queue at the post office", ["queue", "line", "post office"]),
    ("a power cut in the evening", ["power", "electric", "dark", "outage"]),
    ("a broken washing machine", ["washing", "machine", "laundry"]),
    ("a cold morning commute", ["commut", "cold", "morning"]),
    ("a crowded elevator", ["elevator", "lift", "crowd"]),
    ("a waiting room at a doctor's office", ["waiting", "doctor", "clinic"]),
    ("a flat tire on the way to work", ["tire", "tyre", "flat", "wheel"]),
    ("a noisy neighbor", ["neighbo", "noise", "noisy"]),
    ("a parking lot in the rain", ["parking", "car", "rain"]),
    ("doing the dishes after dinner", ["dish", "sink", "wash"]),
    ("a slow internet connection", ["internet", "connection", "wifi", "slow"]),
    ("a missed bus", ["bus", "miss"]),
    ("an overdue electricity bill", ["bill", "electric", "pay"]),
    ("a grey winter afternoon", ["winter", "grey", "gray", "afternoon"]),
    ("a crowded supermarket on Saturday", ["supermarket", "shop", "store", "crowd"]),
    ("a leaking kitchen tap", ["tap", "faucet", "leak", "drip"]),
    ("a long meeting at work", ["meeting", "work", "office"]),
    ("filling in a tax form", ["tax", "form"]),
    ("a cancelled flight", ["flight", "cancel", "airport", "plane"]),
    ("a queue at the bank", ["bank", "queue", "line"]),
    ("cleaning the bathroom", ["bathroom", "clean", "toilet"]),
    ("a cold cup of coffee", ["coffee", "cup", "cold"]),
    ("a dead phone battery", ["phone", "battery", "charg"]),
    ("a foggy road at night", ["fog", "road", "night"]),
    ("an empty fridge on Sunday", ["fridge", "empty", "food"]),
    ("a stuck zipper", ["zip", "stuck"]),
    ("a hospital corridor", ["hospital", "corridor", "hall"]),
    ("a crowded subway car", ["subway", "metro", "train", "crowd"]),
    ("a long drive on the motorway", ["drive", "motorway", "highway", "road"]),
    ("an alarm clock at six in the morning", ["alarm", "clock", "morning", "wake"]),
    ("a broken umbrella in the wind", ["umbrella", "wind"]),
    ("a dentist appointment", ["dentist", "teeth", "tooth"]),
    ("ironing a pile of shirts", ["iron", "shirt"]),
    ("a lost set of keys", ["key", "lost"]),
    ("a slow checkout line", ["checkout", "line", "queue", "cashier"]),
    ("a cold office in January", ["office", "cold", "january"]),
    ("a printer that keeps jamming", ["printer", "print", "paper", "jam"]),
    ("a muddy football pitch", ["mud", "football", "pitch", "field"]),
    ("a parking ticket", ["ticket", "parking", "fine"]),
    ("a crowded beach in August", ["beach", "crowd", "sand"]),
    ("an old car that will not start", ["car", "engine", "start"]),
    ("moving boxes in a new flat", ["box", "moving", "flat", "apartment"]),
    ("a rainy weekend indoors", ["rain", "weekend", "indoor", "inside"]),
    ("a burnt piece of toast", ["toast", "burn", "bread"]),
    ("a busy train station at rush hour", ["station", "train", "rush", "crowd"]),
    ("a dripping roof", ["roof", "drip", "leak", "ceiling"]),
    ("a noisy construction site", ["construction", "noise", "site", "build"]),
    ("a late night at the office", ["office", "late", "night", "work"]),
    ("waiting for a delivery", ["deliver", "parcel", "package", "wait"]),
    ("a hot crowded bus", ["bus", "hot", "crowd"]),
    ("an unanswered email", ["email", "e-mail", "reply", "inbox"]),
    ("a cracked phone screen", ["phone", "screen", "crack"]),
    ("a stormy night", ["storm", "night", "thunder", "wind"]),
    ("a long flight in economy class", ["flight", "plane", "seat", "economy"]),
    ("a cluttered garage", ["garage", "clutter", "mess"]),
    ("a school exam", ["exam", "test", "school", "student"]),
    ("a job interview", ["interview", "job"]),
    ("a cold that will not go away", ["cold", "sick", "cough", "nose"]),
    ("a tiring day of errands", ["errand", "tired", "tiring", "shop"]),
    ("a boring lecture", ["lecture", "class", "professor", "boring"]),
    ("a blocked drain", ["drain", "block", "sink", "pipe"]),
]

HELDOUT_SITUATIONS = [
    ("a rush hour tram", ["tram", "rush", "crowd"]),
    ("a queue at the airport security check", ["airport", "security", "queue", "line"]),
    ("a rainy bus stop", ["bus", "stop", "rain"]),
    ("a broken dishwasher", ["dishwasher", "dish", "broken"]),
    ("a long wait at the car repair shop", ["repair", "car", "garage", "mechanic", "wait"]),
    ("a wet Tuesday morning", ["tuesday", "morning", "wet", "rain"]),
    ("a snowed-in driveway", ["snow", "driveway", "shovel"]),
    ("a crowded waiting room at the vet", ["vet", "waiting", "animal", "pet", "dog", "cat"]),
    ("a power outage during a storm", ["power", "outage", "storm", "dark"]),
    ("an overflowing laundry basket", ["laundry", "basket", "cloth"]),
    ("a train that stops between stations", ["train", "station", "stop"]),
    ("a queue at the pharmacy", ["pharmacy", "queue", "line", "medicine"]),
    ("a Monday morning staff meeting", ["meeting", "monday", "staff", "work"]),
    ("a leaking bathroom ceiling", ["ceiling", "leak", "bathroom", "water"]),
    ("a cold bedroom in winter", ["bedroom", "cold", "winter", "bed"]),
    ("a car stuck in snow", ["car", "snow", "stuck"]),
    ("a slow computer update", ["computer", "update", "slow", "screen"]),
    ("a crowded ferry", ["ferry", "boat", "crowd", "sea"]),
    ("a missed phone call from the landlord", ["landlord", "phone", "call", "rent"]),
    ("a late-night grocery run", ["grocer", "store", "shop", "night"]),
    ("a windy walk to school", ["wind", "walk", "school"]),
    ("a flooded basement", ["flood", "basement", "water"]),
    ("a delayed pizza delivery", ["pizza", "deliver", "delay"]),
    ("a morning with no hot water", ["hot water", "shower", "water", "cold"]),
    ("a jammed photocopier", ["photocop", "copier", "copy", "paper", "jam"]),
    ("a long hospital night shift", ["hospital", "shift", "night", "nurse"]),
    ("a motorway roadworks delay", ["roadwork", "motorway", "highway", "road", "delay"]),
    ("a blocked toilet", ["toilet", "block", "bathroom"]),
    ("a grey November weekend", ["november", "weekend", "grey", "gray"]),
    ("an expired bus pass", ["bus", "pass", "expire", "ticket"]),
    ("a full inbox after a holiday", ["inbox", "email", "e-mail", "holiday", "message"]),
    ("a rainy school sports day", ["sport", "school", "rain"]),
    ("a loud party next door", ["party", "loud", "neighbo", "music", "noise"]),
    ("a queue at the post office before Christmas", ["post office", "queue", "christmas", "line"]),
    ("a long night on a train platform", ["platform", "train", "night", "station"]),
    ("a broken heater in the office", ["heater", "heating", "office", "cold"]),
]

PHRASINGS = [
    "Describe {s}.",
    "Tell me about {s}.",
    "Write a few sentences about {s}.",
    "Write a short paragraph describing {s}.",
    "What is {s} like?",
    "Give a short description of {s}.",
]

PER_TRAIN_SITUATION, PER_HELDOUT_SITUATION = 4, 3


def rows(situations, per_situation: int, split: str, rng: random.Random) -> list[dict]:
    """`per_situation` distinct phrasings of each situation, shuffled, with ids in order."""
    out = []
    for phrase, topic in situations:
        for template in rng.sample(PHRASINGS, per_situation):
            out.append({"prompt": template.format(s=phrase), "situation": phrase,
                        "topic": topic})
    rng.shuffle(out)
    return [{"id": f"{split}-{i:04d}", **r} for i, r in enumerate(out)]


def check(train: list[dict], heldout: list[dict]) -> None:
    """Held-out situations never occur in training; every topic stem is lowercase."""
    seen = {r["situation"] for r in train}
    leaked = sorted({r["situation"] for r in heldout} & seen)
    if leaked:
        raise ValueError(f"held-out situations also in training: {leaked}")
    for r in train + heldout:
        if any(t != t.lower() for t in r["topic"]):
            raise ValueError(f"topic stems must be lowercase: {r['topic']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=Path("data/sentiment"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    train = rows(TRAIN_SITUATIONS, PER_TRAIN_SITUATION, "train", rng)
    heldout = rows(HELDOUT_SITUATIONS, PER_HELDOUT_SITUATION, "heldout", rng)
    check(train, heldout)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("train", train), ("heldout", heldout)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
        (args.out_dir / f"{name}.jsonl").write_text(text, encoding="utf-8")
    print(f"wrote {len(train)} training and {len(heldout)} held-out prompts "
          f"({len(TRAIN_SITUATIONS)} and {len(HELDOUT_SITUATIONS)} situations) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
