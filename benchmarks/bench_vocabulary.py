#!/usr/bin/env python3
"""Typo-tolerant vocabulary search: rapidfuzz against the standard library's difflib, on the real vocabulary.

    python benchmarks/bench_vocabulary.py [--every N]

``--every N`` keeps every N-th query (difflib needs seconds per query, so the full set takes long).

Queries: every class name of the shipped vocabulary with one typo (two neighbouring letters of its longest
word swapped, the commonest typing error), plus the same word alone (``kidnye`` for ``Left kidney``).
A query is found when its class is among the first 5 results. Both scorers run the same search rule as
``text3dsam_cli.prompts.search_vocabulary`` (best partial match of the query in the class name, or 10 points
lower in a phrasing; cutoff 80); difflib has no partial ratio, so its partial score is the best
``SequenceMatcher.ratio`` over the name's windows of the query's length. Prints hit rates and times.
"""

from __future__ import annotations

import argparse
import difflib
import time

from rapidfuzz import fuzz

from text3dsam_cli.prompts import SEARCH_CUTOFF, load_vocabulary, normalize_text


def typo(word: str) -> str:
    i = max(1, len(word) // 2 - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:] if len(word) > 3 else word


def difflib_partial(query: str, text: str) -> float:
    if len(text) <= len(query):
        return 100 * difflib.SequenceMatcher(None, query, text).ratio()
    return 100 * max(difflib.SequenceMatcher(None, query, text[i:i + len(query)]).ratio()
                     for i in range(len(text) - len(query) + 1))


def search(query: str, entries, partial) -> list[str]:
    key = normalize_text(query)
    scored = []
    for entry in entries:
        score = partial(key, normalize_text(entry.name))
        if score < 100:
            score = max(score, max(partial(key, normalize_text(p)) for p in entry.phrasings) - 10)
        if score >= SEARCH_CUTOFF:
            scored.append((-score, entry.name.casefold(), entry.name))
    return [name for *_, name in sorted(scored)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1, help="keep every N-th query")
    args = parser.parse_args()
    entries = load_vocabulary()
    queries = []
    for name in sorted({e.name for e in entries}):
        words = normalize_text(name).split()
        longest = max(words, key=len)
        if len(longest) > 3:
            queries.append((normalize_text(name).replace(longest, typo(longest)), name))
            queries.append((typo(longest), name))
    queries = queries[::args.every]
    for label, partial in (("rapidfuzz", fuzz.partial_ratio), ("difflib", difflib_partial)):
        t = time.perf_counter()
        hits = sum(target in search(q, entries, partial)[:5] for q, target in queries)
        seconds = time.perf_counter() - t
        print(f"{label:9s}: {hits}/{len(queries)} typo queries find their class in the top 5; "
              f"{1000 * seconds / len(queries):.1f} ms per query")


if __name__ == "__main__":
    main()
