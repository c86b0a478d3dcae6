"""The `template` backend: an offline, deterministic baseline that needs no LLM.

It is a baseline, not a rewriter: it does not paraphrase or add knowledge. It exists so that the
whole pipeline (and the demo) runs on a laptop without an endpoint, and so that an LLM's output
has something simple to be compared with. Every choice is a seeded hash of the record's key, so
the same input gives the same output on any machine. Its wordings are in
configs/synth/template.json, neutral enough to read right both in an assistant's reply and in a
third-person article; its version (the records' prompt_sha) hashes that file and this module.

- rephrase: the piece's sentences that are safe to keep, framed in the style's voice (the seven
  styles of PAPER.md §2, as speakers and connecting lines), with a note on why the topic is
  sensitive (its category's `notes`, else its `harms`). "Safe to keep" is the safety
  classifier's verdict (score <= `sentence_max_score`) when one is given; without one, a sentence is kept only if it names none of the category
  markers below and holds no link, e-mail address or long number. The markers catch topics, not
  slurs or profanity: pass --classifier for real data. A piece with no sentence left is invalid.
- refuseweb: a user request for the harm the piece is about, in the words of its category (the
  category whose markers the piece names most: violence, weapons, drugs, self-harm, hate, sexual,
  theft and fraud, hacking, privacy, extremism, or general), and an assistant turn that
  acknowledges without judging, refuses, explains the harm and offers an alternative, each part
  picked from varied wordings; half the dialogues have a second exchange (a push back, a held
  refusal). The document's own words are never used: at scores 4-5 none of them are safe.
- moral: a third-person article with headings (what happened, why the answer was no, the
  principle, a better way, beyond this conversation) about the dialogue's category.
"""

from __future__ import annotations

import collections
import json
import random
import re
from collections.abc import Callable, Sequence

from safejax import errors
from safejax.safety import resumable
from safejax.synth import pieces, prompts
from safejax.synth.jobs import Item, Outcome

_WORD = re.compile(r"[a-z][a-z'-]+")
_UNSAFE_TO_QUOTE = re.compile(r"https?://|www\.|@|\d[\d\s().-]{6,}\d")  # links, e-mails, phone/ID numbers
SENTENCE_WORDS = (4, 60)  # sentences kept by rephrase: at least / at most this many words
GROUP = 3  # sentences said together in one turn


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" or word.isupper() else "a ") + word


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower(name: str) -> str:
    return name if name.isupper() else name.lower()


class TemplateBackend:
    name = "template"

    def __init__(self, wordings_file: str = "synth/template.json",
                 safe_sentences: Callable[[list[str]], list[bool]] | None = None):
        """`safe_sentences`: the classifier's verdict on a list of sentences (None: the markers)."""
        path = resumable.find_config_file(wordings_file)
        with open(path, encoding="utf-8") as f:
            content = f.read()
        try:
            self.words = json.loads(content)
            categories = self.words["categories"]
            self.styles = self.words["styles"]
        except (ValueError, KeyError) as e:
            raise errors.UserError(f"{path} is not a template wordings file: {e}") from None
        with open(__file__, encoding="utf-8") as f:
            self.sha = prompts.content_sha(content, f.read())
        self.model = "template"
        self._markers = {name: re.compile(r"\b(?:" + "|".join(map(re.escape, c["markers"])) + r")", re.IGNORECASE)
                         for name, c in categories.items() if c["markers"]}
        self._categories = categories
        self._stopwords = set(self.words["stopwords"])
        self._safe_sentences = safe_sentences or self._no_marker

    def check_styles(self, styles: Sequence[str]) -> None:
        unknown = [s for s in styles if s not in self.styles]
        if unknown:
            raise errors.UserError(f"style {unknown[0]!r} has no wordings in the template file")

    # --- shared pieces ------------------------------------------------------------------

    def category(self, text: str) -> str:
        """The category whose markers the text names most (ties: the first listed), else general."""
        counts = {name: len(marker.findall(text)) for name, marker in self._markers.items()}
        best = max(counts, key=counts.get, default=None)
        return best if best and counts[best] else "general"

    def _no_marker(self, sentences: list[str]) -> list[bool]:
        return [not any(m.search(s) for m in self._markers.values()) for s in sentences]

    def _topic(self, sentences: list[str]) -> str:
        """The two content words the kept sentences use most ("river and bridge")."""
        counts = collections.Counter(w for s in sentences for w in _WORD.findall(s.lower())
                                     if len(w) > 3 and w not in self._stopwords)
        top = [w for w, _ in counts.most_common(2)]
        return " and ".join(top) if top else "this subject"

    # --- the three jobs -----------------------------------------------------------------

    def produce(self, job: str, item: Item) -> Outcome:
        return self.produce_many(job, [item])[0]

    def produce_many(self, job: str, items: Sequence[Item]) -> list[Outcome]:
        """The items' outcomes, in order. Rephrase asks the classifier about every candidate
        sentence of all the items in one call: a piece's few dozen sentences alone fill one
        padded batch at the longest one's length, many pieces' sorted by length fill them densely."""
        if job == "rephrase":
            kept = self._safe_to_keep([self._candidates(item.text) for item in items])
            return [self._rephrase(item, random.Random(item.key), k) for item, k in zip(items, kept)]
        make = {"refuseweb": self._refuseweb, "moral": self._moral}[job]
        return [make(item, random.Random(item.key)) for item in items]

    def _candidates(self, text: str) -> list[str]:
        return [s for s in pieces.sentences(text)
                if SENTENCE_WORDS[0] <= len(s.split()) <= SENTENCE_WORDS[1] and not _UNSAFE_TO_QUOTE.search(s)]

    def _safe_to_keep(self, candidates: list[list[str]]) -> list[list[str]]:
        """Each list's sentences that `safe_sentences` keeps, from one call over all of them."""
        verdicts = self._safe_sentences([s for c in candidates for s in c]) if any(candidates) else []
        kept, start = [], 0
        for sentences in candidates:
            kept.append([s for s, safe in zip(sentences, verdicts[start:start + len(sentences)]) if safe])
            start += len(sentences)
        return kept

    def _rephrase(self, item: Item, rng: random.Random, kept: list[str]) -> Outcome:
        category = self.category(item.text)
        if not kept:
            return Outcome(error="no sentence of the piece is safe to keep", category=category)
        style = self.styles[item.style]
        topic = self._topic(kept)
        speakers = style.get("speakers") or []
        asker, explainer = speakers if len(speakers) == 2 else (style.get("voice", ""),) * 2
        lines = []

        def say(speaker: str, text: str) -> None:
            lines.append(f"{speaker}: {text}" if speaker else text)

        values = {"topic": topic, "Topic": _capital(topic)}
        say(asker, prompts.fill(rng.choice(style["open"]), values))
        for i in range(0, len(kept), GROUP):
            if i:
                say(asker, rng.choice(style["ask"]))
            say(explainer, " ".join(kept[i:i + GROUP]))
        words = self._categories[category]
        note = f"{rng.choice(words.get('notes', words['harms']))} {rng.choice(words['alternatives'])}"
        say(explainer, rng.choice(style["sensitive"]).replace("{note}", note))
        say(asker, prompts.fill(rng.choice(style["close"]), values))
        return Outcome(output="\n\n".join(lines), category=category)

    def _refuseweb(self, item: Item, rng: random.Random) -> Outcome:
        category = self.category(item.text)
        words, general = self._categories[category], self.words
        answer = " ".join([rng.choice(general["acknowledge"]), rng.choice(general["refuse"]),
                           rng.choice(words["harms"]), rng.choice(words["alternatives"])])
        turns = [{"role": "user", "text": rng.choice(words["requests"])}, {"role": "assistant", "text": answer}]
        if rng.random() < 0.5:
            turns += [{"role": "user", "text": rng.choice(general["pushback"])},
                      {"role": "assistant", "text": f"{rng.choice(general['hold'])} {rng.choice(words['alternatives'])}"}]
        return Outcome(output=turns, category=category)

    def _moral(self, item: Item, rng: random.Random) -> Outcome:
        asked = " ".join(t["text"] for t in item.turns if t["role"] == "user")
        category = item.category if item.category in self._categories else self.category(asked)
        words, article = self._categories[category], self.words["article"]
        user, assistant = (_lower(n) for n in item.roles)
        values = {"topic": words["topic"], "A_user": _capital(_article(user)), "a_user": _article(user),
                "a_assistant": _article(assistant), "the_user": f"the {user}", "the_assistant": f"the {assistant}",
                "The_assistant": f"The {assistant}"}

        def line(options) -> str:
            return prompts.fill(rng.choice(options), values)

        heads = article["headings"]
        sections = [line(article["title"]),
                    heads["story"], f"{line(article['asked'])} {line(article['answered'])}",
                    heads["why"], " ".join(words["harms"]),
                    heads["principle"], " ".join(words["principles"]),
                    heads["instead"], f"{line(article['alternative'])} {rng.choice(words['alternatives'])}",
                    heads["everyday"], line(article["everyday"])]
        return Outcome(output="\n\n".join(sections), category=category)
