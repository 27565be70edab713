"""The embedded toy world: a tiny topic-conditioned language whose "human" is a known gold reward.

- Prompts ask about one of TOPICS ("talk about <topic>", sometimes with a polite word); a response is a
  sequence of words from the topics' vocabularies and a few fillers, ended by the end-of-turn token.
- The gold reward has token-level structure: each distinct word of the asked topic earns +1, each word of the
  topic's rival (the next topic) costs -1, fillers are neutral; a repeated content word costs 0.75; lengths
  outside [MIN_LEN, MAX_LEN] cost 0.5 per word (runaway) and an empty or one-word answer costs 3. Reward hacking
  of a learned reward model (say, many on-topic words repeated, or runaway length) shows as gold falling while
  the RM score rises.
- The SFT corpus comes from a noisy writer whose answers vary in quality (on-topic, off-topic and rival
  words, fillers, repeats, uneven lengths); preference pairs are two such answers to one prompt, labelled by a
  Bradley-Terry draw on the gold reward (sentence-level signal only).
Everything is written in the real datasets' schemas (SFT messages, UltraFeedback-style pairs, prompt
messages), so every trainer reads it through the ordinary data code.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from rto.models import tiny_causal_lm, tiny_tokenizer

TOPICS = {
    "animals": "cat dog horse bird fish lion tiger bear wolf mouse",
    "food": "bread cheese apple soup rice cake salad pasta honey pie",
    "sports": "ball goal team run race swim jump score coach match",
    "music": "song piano drum guitar tune voice band choir rhythm note",
}
FILLERS = "the a and very so with is".split()
PROMPT_WORDS = ["talk", "about", "please", "now", "tell", "me"]
MIN_LEN, MAX_LEN = 4, 12
TOPIC_NAMES = list(TOPICS)
WORD_TOPIC = {w: t for t, ws in TOPICS.items() for w in ws.split()}


def vocabulary() -> list[str]:
    return TOPIC_NAMES + PROMPT_WORDS + FILLERS + [w for ws in TOPICS.values() for w in ws.split()]


def tokenizer():
    return tiny_tokenizer(vocabulary())


def rival(topic: str) -> str:
    return TOPIC_NAMES[(TOPIC_NAMES.index(topic) + 1) % len(TOPIC_NAMES)]


def prompt_text(topic: str, rng: random.Random) -> str:
    lead = rng.choice(["talk about", "tell me about", "please talk about", "now tell me about"])
    return f"{lead} {topic}"


def topic_of(prompt: str) -> str:
    """The topic a prompt asks about (its last topic word)."""
    found = [w for w in prompt.split() if w in TOPICS]
    if not found:
        raise ValueError(f"not a toy prompt (no topic word): {prompt!r}")
    return found[-1]


def gold_reward(topic: str, words: list[str]) -> float:
    """The known "human" judgement of a response (a list of words, end-of-turn excluded)."""
    if len(words) <= 1:
        return -3.0
    seen: set[str] = set()
    total = 0.0
    for w in words:
        t = WORD_TOPIC.get(w)
        if t is None:
            continue
        if w in seen:
            total -= 0.75
            continue
        seen.add(w)
        total += 1.0 if t == topic else (-1.0 if t == rival(topic) else 0.0)
    total -= 0.5 * max(0, MIN_LEN - len(words)) + 0.5 * max(0, len(words) - MAX_LEN)
    return total


def noisy_answer(topic: str, rng: random.Random) -> list[str]:
    """One answer of the noisy writer: a quality level per answer, then words drawn by it."""
    skill = rng.random()  # 0: careless, 1: careful
    n = rng.randint(2, 16)
    on = TOPICS[topic].split()
    other = [w for t in TOPIC_NAMES if t not in (topic, rival(topic)) for w in TOPICS[t].split()]
    bad = TOPICS[rival(topic)].split()
    words = []
    for _ in range(n):
        u = rng.random()
        if u < 0.25 + 0.5 * skill:
            pool = on
        elif u < 0.55 + 0.3 * skill:
            pool = FILLERS
        elif u < 0.8 + 0.1 * skill:
            pool = other
        else:
            pool = bad
        if words and rng.random() < 0.25 * (1 - skill):  # careless writers repeat themselves
            words.append(rng.choice(words))
        else:
            words.append(rng.choice(pool))
    return words


def _conversation(prompt: str, answer: list[str] | None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": " ".join(answer)})
    return msgs


def build_world(
    out: Path, *, seed: int = 0, n_sft: int = 4000, n_pairs: int = 3000, n_prompts: int = 2048, n_eval: int = 128,
    bt_beta: float = 1.0, hidden: int = 64, layers: int = 2,
) -> dict[str, str]:  # fmt: skip
    """Write the toy world under `out`; returns the paths (as strings) of what it wrote."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    def topic() -> str:
        return rng.choice(TOPIC_NAMES)

    sft = []
    for _ in range(n_sft):
        t = topic()
        sft.append({"messages": _conversation(prompt_text(t, rng), noisy_answer(t, rng))})
    pairs, eval_pairs = [], []
    for i in range(n_pairs):
        t = topic()
        p = prompt_text(t, rng)
        a, b = noisy_answer(t, rng), noisy_answer(t, rng)
        p_a = 1 / (1 + math.exp(-bt_beta * (gold_reward(t, a) - gold_reward(t, b))))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        row = {"prompt": p, "chosen": _conversation(p, chosen), "rejected": _conversation(p, rejected)}
        (eval_pairs if i < n_pairs // 10 else pairs).append(row)
    prompts = [{"messages": _conversation(prompt_text(t, rng), None)} for t in (topic() for _ in range(n_prompts))]
    eval_prompts = [{"messages": _conversation(prompt_text(t, rng), None)} for t in (topic() for _ in range(n_eval))]
    paths = {}
    for name, rows in (("sft", sft), ("prefs", pairs), ("prefs_eval", eval_pairs), ("prompts", prompts),
                       ("eval_prompts", eval_prompts)):  # fmt: skip
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(path)
    tok = tokenizer()
    base = out / "base"
    tiny_causal_lm(len(tok), hidden=hidden, layers=layers, seed=seed).save_pretrained(base)
    tok.save_pretrained(base)
    paths["base"] = str(base)
    return paths


def response_gold(prompt_ids: list[int], response_ids: list[int], tok) -> float:
    """Gold reward of a tokenised response to a tokenised toy prompt."""
    prompt = tok.decode(prompt_ids, skip_special_tokens=True)
    words = tok.decode(response_ids, skip_special_tokens=True).split()
    return gold_reward(topic_of(prompt), words)
