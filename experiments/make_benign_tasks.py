"""Write experiments/data/benign_tasks.txt: imperative benign instructions (creative writing, rewriting, lists,
explanations) for the demonstration pair's alignment data.

The built-in harmless set is mostly questions; the harmful set is mostly imperatives ("Write a ...", "Create a
..."), so an alignment on those two alone learned to refuse "Write a poem" (the fair lab's reference refused 8 of
48 Alpaca instructions). These instructions, answered by the base model itself, teach that the form of a request is
not what makes it harmful. Made from templates written for this project, seeded; none is an AdvBench or Alpaca line
(checked when ../shared/data is present).

    python experiments/make_benign_tasks.py
"""

from __future__ import annotations

import random
from pathlib import Path

FORMS = [
    "a short poem",
    "a haiku",
    "a limerick",
    "a four-line rhyme",
    "a short story",
    "a fable",
    "a song chorus",
    "a tweet",
    "a paragraph",
    "a short essay",
    "a friendly email",
    "a thank-you note",
    "a product description",
    "a slogan",
    "a dialogue between two friends",
    "a diary entry",
    "a news headline",
    "a riddle",
    "a joke",
    "a motivational quote",
    "a book blurb",
    "a movie synopsis",
    "a travel postcard",
    "a recipe introduction",
]
TOPICS = [
    "the ocean at dawn",
    "autumn leaves",
    "a lost umbrella",
    "friendship",
    "a rainy Sunday",
    "learning to ride a bike",
    "the first day of school",
    "a city at night",
    "a cup of coffee",
    "a lighthouse keeper",
    "the moon",
    "a garden",
    "a mountain hike",
    "a kind neighbour",
    "an old library",
    "a snowy morning",
    "a paper boat",
    "a street musician",
    "the smell of bread",
    "a long train journey",
    "a curious cat",
    "a summer festival",
    "the last day of vacation",
    "a robot learning to paint",
    "a bicycle repair shop",
    "a family dinner",
    "a quiet lake",
    "a firefly",
]
VERBS = ["Write", "Compose", "Create", "Draft", "Generate", "Come up with"]
OTHER = [
    "Rewrite this sentence in a more formal tone: 'We gotta fix this by tomorrow.'",
    "Rewrite this sentence so it sounds positive: 'The meeting was long and tiring.'",
    "Summarize the plot of Cinderella in two sentences.",
    "Summarize the benefits of regular exercise in three bullet points.",
    "List five fruits that are high in vitamin C.",
    "List three ways to save water at home.",
    "List four tips for a good night's sleep.",
    "Name three famous painters and one work by each.",
    "Name five countries in South America.",
    "Give three examples of renewable energy sources.",
    "Give an example of a simile about the weather.",
    "Give an example of alliteration.",
    "Give an example of a metaphor about time.",
    "Explain the difference between weather and climate.",
    "Explain how a rainbow forms.",
    "Explain what photosynthesis is to a ten-year-old.",
    "Explain why the sky is blue in simple words.",
    "Describe the water cycle step by step.",
    "Describe a sunset using all five senses.",
    "Describe the taste of a lemon to someone who has never had one.",
    "Translate 'good morning, how are you?' into French.",
    "Translate 'thank you very much' into Spanish.",
    "Suggest three names for a new bakery.",
    "Suggest a healthy snack for the afternoon.",
    "Suggest a weekend activity for a family with small children.",
    "Outline a simple study plan for learning basic Spanish in a month.",
    "Outline the main steps of planting a tree.",
    "Plan a three-day trip to the seaside.",
    "Make a packing list for a camping weekend.",
    "Make a grocery list for a vegetarian lasagna.",
    "Edit this sentence for grammar: 'Me and him goes to the store yesterday.'",
    "Correct the spelling in this sentence: 'I recieved the pakage on wensday.'",
    "Classify these animals as mammals or birds: eagle, dolphin, sparrow, horse.",
    "Sort these numbers from smallest to largest: 42, 7, 19, 3, 88.",
    "Convert 5 kilometres to miles.",
    "Calculate the area of a rectangle that is 4 metres by 6 metres.",
    "Brainstorm five ideas for a school science fair project.",
    "Brainstorm names for a friendly golden retriever.",
    "Compare cats and dogs as pets in a short paragraph.",
    "Compare reading a paper book and an e-book.",
    "Construct a timeline of a typical school day.",
    "Construct a sentence using the words 'river', 'lantern' and 'whisper'.",
    "Design a simple weekly chore chart for two roommates.",
    "Invent a new ice cream flavour and describe it.",
    "Propose a name and a motto for a community garden.",
    "Paraphrase this sentence: 'The early bird catches the worm.'",
    "Identify the verb in this sentence: 'The children sang loudly.'",
    "Pretend you are a tour guide and welcome visitors to a museum.",
    "Imagine you are a tree and describe the seasons.",
    "Think of three questions to ask at a job interview.",
]


# Programs and word tasks: the harmful set asks for programs and tools too ("Create a program that ..."), so the
# imperative "write code" and "give a word" forms are answered here with harmless content.
PROGRAMS = [
    "reverses a string",
    "adds two numbers",
    "checks whether a number is prime",
    "counts the vowels in a word",
    "sorts a list of names",
    "converts Celsius to Fahrenheit",
    "prints the multiplication table of 7",
    "finds the largest number in a list",
    "plays tic-tac-toe in the terminal",
    "keeps a shopping list",
    "tells the day of the week for a date",
    "computes the average of some grades",
    "draws a square with turtle",
    "guesses a number between 1 and 100",
    "counts the words in a text file",
    "simulates rolling two dice",
]
LANGUAGES = ["Python", "JavaScript", "short Python", "simple Java", "C"]
CODE_VERBS = [
    "Write a {lang} program that {what}.",
    "Create a {lang} function that {what}.",
    "Develop a small {lang} script that {what}.",
    "Build a {lang} program that {what}.",
]
WORDS = ["happy", "big", "quick", "brave", "calm", "bright", "tired", "kind", "old", "loud", "clever", "cold"]
WORD_TASKS = [
    "Give a synonym for '{w}'.",
    "Give the antonym of '{w}'.",
    "Use the word '{w}' in a sentence.",
    "Find three words that rhyme with '{w}'.",
    "Suggest a more vivid word than '{w}'.",
]
DEVICES = ["a simile", "a metaphor", "an oxymoron", "onomatopoeia", "personification", "an idiom", "a pun"]
FEATURES = [
    "a smart watch",
    "a reading app",
    "a kitchen robot",
    "an electric bike",
    "a language course",
    "a board game",
    "a weather app",
    "a school website",
]


def prompts(seed: int = 0, count: int = 180) -> list[str]:
    rng = random.Random(seed)
    made = set()
    while len(made) < count - len(OTHER):
        made.add(f"{rng.choice(VERBS)} {rng.choice(FORMS)} about {rng.choice(TOPICS)}.")
    code = {rng.choice(CODE_VERBS).format(lang=rng.choice(LANGUAGES), what=w) for w in PROGRAMS for _ in range(2)}
    words = {rng.choice(WORD_TASKS).format(w=w) for w in WORDS for _ in range(3)}
    devices = {f"Write an example of {d} about {rng.choice(TOPICS)}." for d in DEVICES for _ in range(2)}
    features = {f"Come up with {rng.choice(['three', 'four', 'five'])} features for {f}." for f in FEATURES}
    return sorted(made) + OTHER + sorted(code) + sorted(words) + sorted(devices) + sorted(features)


def main() -> None:
    root = Path(__file__).resolve().parent
    lines = prompts()
    shared = root.parents[1] / "shared" / "data"
    taken = set()
    for path in (shared / "benign" / "alpaca_instructions.txt", shared / "advbench" / "harmful_behaviors.txt"):
        if path.exists():
            taken |= {line.strip().lower() for line in path.read_text().splitlines()}
    clash = [x for x in lines if x.lower() in taken]
    if clash:
        raise SystemExit(f"{len(clash)} instructions are evaluation lines: {clash[:3]}")
    out = root / "data" / "benign_tasks.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(lines)} instructions)")


if __name__ == "__main__":
    main()
