"""The embedded toy worlds: a tiny topic-conditioned language whose "human" is a known gold reward.

Prompts ask about one of TOPICS ("talk about <topic>", sometimes with a polite word); a response is a sequence of
words from the topics' vocabularies and a few fillers, ended by the end-of-turn token. Two worlds share that
language and differ in what the gold reward values (`world.kind` in the pipeline):
- `bag` (the default): each distinct word of the asked topic earns +1, each word of the topic's rival (the next
  topic) costs -1, fillers are neutral; a repeated content word costs 0.75; lengths outside [MIN_LEN, MAX_LEN]
  cost 0.5 per word (runaway) and an empty or one-word answer costs 3. A word's value does not depend on where it
  stands, so the sentence-level signal is all a learner needs.
- `chain` (`world.length=L`): the value lives in transitions. Per world seed each topic's words are put in an
  order w0..w9; after wi the words w(i+1), w(i+3), w(i+4) are good (+1) and wi, w(i+2), w(i+5), w(i+7) bad (-1)
  (indices mod 10), so no word is good on its own. A rival-topic word costs 1, a token outside the response
  vocabulary (prompt words, topic names, special tokens other than the final end-of-turn) costs 2, anything else
  is 0; an answer shorter than L words costs 1 per missing word.
Both golds decompose over response tokens (`World.token_gold`, the length terms on the last token), which is
what the pipeline's mechanism metrics correlate the DPO term and the advantages with.
The SFT corpus comes from a noisy writer whose answers vary in quality; preference pairs are two such answers to
one prompt, labelled by a Bradley-Terry draw on the gold reward (sentence-level signal only; the chain world's
temperature is bt_beta * CHAIN_BT / L, which keeps about 80% agreement with the gold order at every L).
Everything is written in the real datasets' schemas (SFT messages, UltraFeedback-style pairs, prompt messages),
so every trainer reads it through the ordinary data code.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from rto.models import TINY_SPECIALS, tiny_causal_lm, tiny_tokenizer

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
END = "<|end|>"  # the tokenizer's end-of-turn token (EOS)
RESPONSE_VOCAB = frozenset(FILLERS) | frozenset(WORD_TOPIC)  # every word the writers ever use
KINDS = ("bag", "chain")
GOOD_STEPS, BAD_STEPS = (1, 3, 4), (0, 2, 5, 7)  # chain world: order offsets of good / bad next words
CHAIN_BT = 6.0  # chain world: Bradley-Terry temperature times L (measured: ~0.80 agreement at L = 12, 48, 96)


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


def bag_token_gold(topic: str, tokens: list[str]) -> list[float]:
    """Bag world: each response token's share of the gold reward [len(tokens)]; special tokens (which the decoder
    drops) are not words and earn 0; the length terms sit on the last token."""
    seen: set[str] = set()
    out = []
    n_words = 0
    for w in tokens:
        t = None if w in TINY_SPECIALS else WORD_TOPIC.get(w)
        n_words += w not in TINY_SPECIALS
        if t is None:
            out.append(0.0)
        elif w in seen:
            out.append(-0.75)
        else:
            seen.add(w)
            out.append(1.0 if t == topic else (-1.0 if t == rival(topic) else 0.0))
    if n_words <= 1:
        return [0.0] * (len(tokens) - 1) + [-3.0]
    out[-1] -= 0.5 * max(0, MIN_LEN - n_words) + 0.5 * max(0, n_words - MAX_LEN)
    return out


def gold_reward(topic: str, words: list[str]) -> float:
    """The bag world's "human" judgement of a response (a list of words, end-of-turn excluded)."""
    return sum(bag_token_gold(topic, [*words, END]))


@functools.lru_cache(maxsize=64)
def chain_orders(seed: int) -> dict[str, tuple[str, ...]]:
    """Chain world: each topic's words in the world's order w0..w9 (a stream of its own, by world seed)."""
    rng = random.Random(f"chain-world-{seed}")
    return {t: tuple(rng.sample(TOPICS[t].split(), 10)) for t in TOPIC_NAMES}


def transition(order: tuple[str, ...], prev: str, word: str) -> int:
    """+1 if `word` is good after `prev` in this order, -1 if bad, 0 if neutral or not two of its words."""
    if prev not in order or word not in order:
        return 0
    step = (order.index(word) - order.index(prev)) % len(order)
    return 1 if step in GOOD_STEPS else (-1 if step in BAD_STEPS else 0)


def out_of_support(tokens: list[str]) -> list[bool]:
    """Which response tokens no writer ever used [len(tokens)]: outside RESPONSE_VOCAB, a final end-of-turn aside."""
    return [w not in RESPONSE_VOCAB and not (w == END and i == len(tokens) - 1) for i, w in enumerate(tokens)]


def chain_token_gold(order: tuple[str, ...], topic: str, length: int, tokens: list[str]) -> list[float]:
    """Chain world: each response token's share of the gold reward [len(tokens)]. A final end-of-turn token is
    not a word; the shortfall below `length` words sits on the last token."""
    rivals = set(TOPICS[rival(topic)].split())
    outside = out_of_support(tokens)
    out = []
    for i, w in enumerate(tokens):
        if outside[i]:
            out.append(-2.0)  # no writer ever wrote it
        elif w in rivals:
            out.append(-1.0)
        else:  # a word of the response vocabulary or the final end-of-turn (which is in no order: 0)
            out.append(float(transition(order, tokens[i - 1], w)) if i else 0.0)
    if out:
        out[-1] -= max(0, length - (len(tokens) - (tokens[-1] == END)))
    return out


def chain_answer(order: tuple[str, ...], topic: str, length: int, rng: random.Random) -> list[str]:
    """One answer of the chain world's writer: skill s ~ U(0, 1), length ~ U(L/2, L); a careful writer follows
    good transitions, a careless one strings topic words at random and strays off topic more."""
    skill = rng.random()
    n = rng.randint((length + 1) // 2, length)
    other = [w for t in TOPIC_NAMES if t not in (topic, rival(topic)) for w in TOPICS[t].split()]
    bad = TOPICS[rival(topic)].split()
    words: list[str] = []
    for _ in range(n):
        u = rng.random()
        if u < 0.5 + 0.4 * skill:
            if words and words[-1] in order and rng.random() < skill:
                words.append(order[(order.index(words[-1]) + rng.choice(GOOD_STEPS)) % len(order)])
            else:
                words.append(rng.choice(order))
        elif u < 0.8 + 0.15 * skill:
            words.append(rng.choice(FILLERS))
        elif u < 0.9 + 0.08 * skill:
            words.append(rng.choice(other))
        else:
            words.append(rng.choice(bad))
    return words


def noisy_answer(topic: str, rng: random.Random) -> list[str]:
    """One answer of the bag world's noisy writer: a quality level per answer, then words drawn by it."""
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


@dataclass(frozen=True)
class World:
    """Which gold reward and writer: `bag` or `chain` (with its answer length and per-seed word orders)."""

    kind: str = "bag"
    seed: int = 0
    length: int = 10

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"world.kind={self.kind!r}: the toy worlds are {', '.join(KINDS)}")
        if self.kind == "chain" and self.length < 2:
            raise ValueError(f"world.length={self.length}: a chain answer needs at least 2 words")

    def order(self, topic: str) -> tuple[str, ...]:
        return chain_orders(self.seed)[topic]

    def token_gold(self, topic: str, tokens: list[str]) -> list[float]:
        """Each response token's share of the gold reward (tokens as strings, a final end-of-turn included)."""
        if self.kind == "bag":
            return bag_token_gold(topic, tokens)
        return chain_token_gold(self.order(topic), topic, self.length, tokens)

    def gold(self, topic: str, words: list[str]) -> float:
        """Gold reward of an answer given as words (end-of-turn excluded)."""
        return sum(self.token_gold(topic, [*words, END]))

    def answer(self, topic: str, rng: random.Random) -> list[str]:
        """One answer of this world's noisy writer."""
        if self.kind == "bag":
            return noisy_answer(topic, rng)
        return chain_answer(self.order(topic), topic, self.length, rng)

    def label_beta(self, bt_beta: float) -> float:
        """Bradley-Terry temperature of the preference labels."""
        return bt_beta if self.kind == "bag" else bt_beta * CHAIN_BT / self.length

    def transitions(self, topic: str, tokens: list[str]) -> tuple[int, int, int]:
        """(good, bad, all) transitions between two adjacent words of the asked topic (chain world's orders)."""
        order = self.order(topic)
        steps = [transition(order, a, b) for a, b in zip(tokens, tokens[1:]) if a in order and b in order]
        return steps.count(1), steps.count(-1), len(steps)

    def to_json(self) -> dict:
        orders = {t: list(o) for t, o in chain_orders(self.seed).items()} if self.kind == "chain" else None
        return {"kind": self.kind, "seed": self.seed, "length": self.length, "orders": orders}


def load_world(world_dir: str | Path) -> World:
    """The World a `build_world` folder was written for (its world.json)."""
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a toy world folder written by rto.toy.build_world")
    spec = json.loads(path.read_text())
    return World(spec["kind"], spec["seed"], spec["length"])


def _conversation(prompt: str, answer: list[str] | None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": " ".join(answer)})
    return msgs


def build_world(
    out: Path,
    *,
    seed: int = 0,
    n_sft: int = 4000,
    n_pairs: int = 3000,
    n_prompts: int = 2048,
    n_eval: int = 128,
    bt_beta: float = 1.0,
    hidden: int = 64,
    layers: int = 2,
    kind: str = "bag",
    length: int = 10,
) -> dict[str, str]:
    """Write the toy world under `out`; returns the paths (as strings) of what it wrote."""
    world = World(kind, seed, length)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    def topic() -> str:
        return rng.choice(TOPIC_NAMES)

    def prompts(n: int) -> list[dict]:
        return [{"messages": _conversation(prompt_text(t, rng), None)} for t in (topic() for _ in range(n))]

    sft = []
    for _ in range(n_sft):
        t = topic()
        sft.append({"messages": _conversation(prompt_text(t, rng), world.answer(t, rng))})
    pairs, eval_pairs = [], []
    beta = world.label_beta(bt_beta)
    for i in range(n_pairs):
        t = topic()
        p = prompt_text(t, rng)
        a, b = world.answer(t, rng), world.answer(t, rng)
        p_a = 1 / (1 + math.exp(-beta * (world.gold(t, a) - world.gold(t, b))))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        row = {"prompt": p, "chosen": _conversation(p, chosen), "rejected": _conversation(p, rejected)}
        (eval_pairs if i < n_pairs // 10 else pairs).append(row)
    sets = {"sft": sft, "prefs": pairs, "prefs_eval": eval_pairs}
    sets["prompts"] = prompts(n_prompts)
    sets["eval_prompts"] = prompts(n_eval)
    paths = {}
    for name, rows in sets.items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(path)
    (out / "world.json").write_text(json.dumps(world.to_json(), indent=1))
    paths["world"] = str(out)
    tok = tokenizer()
    base = out / "base"
    tiny_causal_lm(len(tok), hidden=hidden, layers=layers, seed=seed).save_pretrained(base)
    tok.save_pretrained(base)
    paths["base"] = str(base)
    return paths


def response_gold(prompt_ids: list[int], response_ids: list[int], tok, world: World | None = None) -> float:
    """Gold reward of a tokenised response to a tokenised toy prompt (the bag world unless `world` is given)."""
    return sum(response_token_gold(prompt_ids, response_ids, tok, world))


def response_token_gold(prompt_ids: list[int], response_ids: list[int], tok, world: World | None = None) -> list[float]:
    """Each response token's share of the gold reward [len(response_ids)]."""
    topic = topic_of(tok.decode(prompt_ids, skip_special_tokens=True))
    tokens = tok.convert_ids_to_tokens(response_ids) or [END]  # an empty response is scored as a bare end-of-turn
    return (world or World()).token_gold(topic, tokens)
