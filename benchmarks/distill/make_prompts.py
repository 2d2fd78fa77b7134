"""Writes prompts-270m-more.jsonl: templated code and prose prompts for distilling the 270M drafter.

Tasks and topics written for this file; none is a workloads.jsonl prompt (distill_bench.py checks).

    python -m benchmarks.distill.make_prompts
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

CODE_TASKS = [
    "reverses the words in a sentence",
    "checks whether a number is prime",
    "flattens a nested list",
    "removes duplicates from a list while keeping the order",
    "converts a temperature from Celsius to Fahrenheit",
    "finds the longest common prefix of a list of strings",
    "counts the vowels in a string",
    "returns the factorial of n recursively",
    "computes the greatest common divisor of two integers",
    "parses a query string into a dictionary",
    "groups a list of records by a key",
    "transposes a matrix",
    "checks whether two strings are anagrams",
    "converts a Roman numeral to an integer",
    "returns the second largest number in a list",
    "rotates a list by k positions",
    "computes a moving average",
    "validates a phone number",
    "capitalizes the first letter of every word",
    "sums the digits of an integer",
    "finds all pairs in a list that add up to a target",
    "merges two dictionaries, summing shared keys",
    "converts a camelCase name to snake_case",
    "reads a JSON file and returns the value of a key",
    "computes the median of a list",
    "checks whether brackets in a string are balanced",
    "generates the first n rows of Pascal's triangle",
    "converts bytes to a human-readable size",
    "returns the n most frequent characters in a string",
    "splits a full name into first and last name",
    "implements binary search on a sorted list",
    "implements bubble sort",
    "implements a queue with two stacks",
    "computes the dot product of two vectors",
    "finds the index of the maximum value in a list",
    "counts lines, words and characters in a file",
    "masks all but the last four digits of a card number",
    "returns the dates of all Mondays in a given month",
    "retries a function up to three times on error",
    "caches the results of a function in a dictionary",
    "computes compound interest",
    "converts a list of tuples into a dictionary",
    "checks whether a year is a leap year",
    "truncates a string to n characters with an ellipsis",
    "interleaves two lists",
    "finds the missing number in a list from 1 to n",
    "computes the Levenshtein distance of two strings",
    "parses a simple INI file",
    "formats a number with thousands separators",
    "shuffles a deck of cards",
]
LANGUAGES = ["Python", "Python", "Python", "JavaScript", "TypeScript", "Go", "Rust", "Java"]
CODE_TEMPLATES = [
    "Write a {lang} function that {task}.",
    "Write a {lang} function that {task}, with a short docstring or comment.",
    "Show how to write a {lang} function that {task}, and give one example call.",
    "Write a {lang} function that {task}. Then write two unit tests for it.",
]
TOPICS = [
    "how a hash table works",
    "what a database index is",
    "why unit tests matter",
    "how HTTP caching works",
    "what a race condition is",
    "how garbage collection works",
    "what an API rate limit is",
    "how public-key cryptography works",
    "what technical debt is",
    "how DNS resolves a name",
    "why code review helps a team",
    "what a message queue is for",
    "how a CPU cache works",
    "the difference between a process and a thread",
    "what continuous integration is",
    "how to choose a good password",
    "why backups need to be tested",
    "how compilers turn code into programs",
    "what a virtual machine is",
    "how recommendation systems work",
    "why sleep matters for learning",
    "how photosynthesis works",
    "why the sky is blue",
    "how vaccines train the immune system",
    "how a bicycle stays upright",
    "what inflation is",
    "how bees communicate",
    "why leaves change color",
    "how tides are caused by the moon",
    "what makes a good meeting",
    "how to start running as a beginner",
    "how to write a clear bug report",
    "how to plan a small garden",
    "why open-source licenses exist",
]
PROSE_TEMPLATES = [
    "Explain {topic} in two short paragraphs.",
    "Explain {topic} to a ten-year-old.",
    "Write a short blog post about {topic}.",
    "Give five key points about {topic}, one sentence each.",
    "Write a paragraph about {topic} for a newsletter.",
]
SUBJECTS = [
    "a robot learning to paint",
    "a cat who runs a bakery",
    "two friends lost in a forest",
    "the last train of the night",
    "a girl who can talk to birds",
    "a village where it never stops raining",
    "an old clock that runs backwards",
    "a programmer who finds a bug in the universe",
    "a dragon afraid of heights",
    "a letter delivered fifty years late",
    "a chess game in a park",
    "the first day at a new school",
    "a lost dog finding its way home",
    "a lighthouse in winter",
]
STORY_TEMPLATES = [
    "Write a short story about {subject}.",
    "Write a poem about {subject}.",
    "Write the opening paragraph of a novel about {subject}.",
]
EMAILS = [
    ("the team", "a new holiday schedule"),
    ("a customer", "a delayed order"),
    ("my manager", "a request for a day off"),
    ("a colleague", "thanks for their help on a project"),
    ("the landlord", "a broken heater"),
    ("new employees", "their first week"),
    ("a supplier", "a wrong invoice"),
    ("the club members", "the next meeting"),
]


def prompts(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for task, template in itertools.product(CODE_TASKS, CODE_TEMPLATES):
        out.append({"kind": "code", "prompt": template.format(lang=rng.choice(LANGUAGES), task=task)})
    for topic, template in itertools.product(TOPICS, PROSE_TEMPLATES):
        out.append({"kind": "prose", "prompt": template.format(topic=topic)})
    for subject, template in itertools.product(SUBJECTS, STORY_TEMPLATES):
        out.append({"kind": "long_form", "prompt": template.format(subject=subject)})
    for who, what in EMAILS:
        out.append({"kind": "prose", "prompt": f"Write a short, polite email to {who} about {what}."})
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("prompts-270m-more.jsonl")
    rows = prompts()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} prompts -> {path}")
