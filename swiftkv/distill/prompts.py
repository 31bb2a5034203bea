"""Built-in distillation prompts, written for swiftkv: tasks x topics, plus free-standing requests.

The teacher answers these to make the offline default corpus; distillation only needs text the teacher
has an opinion about, so breadth (tasks, topics, lengths, formats) matters more than quality.
"""

from __future__ import annotations

import random

TASKS = [
    "Explain {topic} to a curious twelve-year-old.",
    "Write a short blog post introduction about {topic}.",
    "List five surprising facts about {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Summarize the history of {topic} in one paragraph.",
    "Write a haiku about {topic}.",
    "Give three practical tips for someone getting started with {topic}.",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
    "What common misconceptions do people have about {topic}?",
    "Compare {topic} with a related idea and explain the difference.",
    "Write a multiple-choice quiz question about {topic}, with the answer.",
    "Describe a typical day for a professional who works with {topic}.",
    "Write a short dialogue between two friends discussing {topic}.",
    "Explain why {topic} matters for the future, in three sentences.",
    "Create an outline for a ten-minute presentation on {topic}.",
    "Write a limerick about {topic}.",
    "What questions should a beginner ask when learning about {topic}?",
    "Write a product description for an imaginary gadget related to {topic}.",
    "Explain {topic} using an analogy from cooking.",
    "Write the opening paragraph of a mystery story that involves {topic}.",
    "Give a step-by-step plan to learn the basics of {topic} in a month.",
    "What are three open problems or debates around {topic}?",
    "Write a tweet-length summary of {topic}.",
    "Translate the key idea of {topic} into simple bullet points.",
]

TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "compound interest",
    "volcanoes", "the human immune system", "jazz music", "renewable energy", "the Roman Empire",
    "sleep", "cryptography", "coral reefs", "supply and demand", "the printing press", "electric cars",
    "meditation", "quantum computing", "bread baking", "climate change", "the Olympic Games",
    "vaccines", "chess", "urban gardening", "the internet", "honeybees", "public speaking",
    "ancient Egypt", "recycling", "marathon training", "impressionist painting", "plate tectonics",
    "open-source software", "personal budgeting", "the Moon landing", "coffee", "origami",
    "the water cycle", "remote work", "dinosaurs",
]

STANDALONE = [
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that returns the ten most recent orders from a table called orders.",
    "Explain what a hash map is and when to use one.",
    "Write a JavaScript function that debounces another function.",
    "How do I reverse a linked list? Give code and an explanation.",
    "Explain recursion with a simple example.",
    "What does the `git rebase` command do?",
    "Write a bash one-liner that counts lines in all .txt files in a folder.",
    "Explain Big-O notation with two examples.",
    "If a train travels 120 km in 1.5 hours, what is its average speed? Show your work.",
    "Solve for x: 3x + 7 = 22. Explain each step.",
    "What is 15% of 240? Explain how to compute it mentally.",
    "A recipe needs 3 eggs for 4 people. How many eggs for 10 people?",
    "Explain the Pythagorean theorem and give a worked example.",
    "What is the probability of rolling two sixes with two dice?",
    "Convert 72 degrees Fahrenheit to Celsius and explain the formula.",
    "Rewrite this sentence to be more formal: 'hey, can u send me the report asap?'",
    "Correct the grammar: 'Me and him goes to the store yesterday.'",
    "Give me a packing list for a weekend camping trip.",
    "Suggest a healthy vegetarian dinner recipe with ingredients and steps.",
    "How can I politely decline a meeting invitation?",
    "What are good questions to ask at the end of a job interview?",
    "Write a thank-you note to a teacher.",
    "Plan a three-day itinerary for a first visit to Rome.",
    "What should I consider when adopting a dog?",
    "Explain the rules of tic-tac-toe and a winning strategy.",
    "Write a short motivational message for someone starting a new job.",
    "Summarize the plot of Romeo and Juliet in five sentences.",
    "Classify these animals as mammals, birds or reptiles: eagle, whale, lizard, bat, penguin, snake.",
    "Extract the names and dates from: 'Alice met Bob on 3 May 2021 and Carol on 9 June 2022.'",
    "Is the following review positive or negative? 'The battery died after two days and support never answered.'",
    "Give three synonyms and three antonyms for 'brave'.",
    "Write a regular expression that matches email addresses and explain its parts.",
    "Explain the difference between weather and climate.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Describe how a bill becomes a law in a parliamentary democracy.",
    "Write a four-line poem about autumn rain.",
    "Brainstorm ten names for a neighborhood bakery.",
    "Explain what inflation is and how central banks respond to it.",
]


def builtin_prompts(seed: int = 0) -> list[str]:
    """Every task x topic pair plus the standalone prompts, shuffled deterministically (1000 prompts)."""
    prompts = [task.format(topic=topic) for task in TASKS for topic in TOPICS] + STANDALONE
    random.Random(seed).shuffle(prompts)
    return prompts


# Openings of raw (non-chat) text in many genres, written for swiftkv: the teacher continues each one, so
# the student also learns to predict plain prose, dialogue, lists and code, not only chat answers.
FREE_TEXT_OPENINGS = [
    "{Topic} is",
    "The history of {topic} begins",
    "In the early years of research on {topic}, scientists",
    "Chapter One\n\nNobody in the village had ever talked about {topic} until",
    "Most people first hear about {topic} when",
    "Q: What is the most important thing to know about {topic}?\nA:",
    "A new report on {topic} published this week suggests that",
    "My grandmother always had strong opinions about {topic}. She used to say",
    "# Notes on {topic}\n\n## Overview\n\n",
    "Abstract. We study {topic} from a new angle.",
    "The following is a transcript of a lecture on {topic}.\n\nProfessor:",
    "Dear diary, today I finally learned something about {topic}.",
    "There are three things every beginner gets wrong about {topic}. The first",
    "When the committee met to discuss {topic}, the chairwoman opened by",
    "It was late in the evening when the conversation turned to {topic}.",
    "Frequently asked questions about {topic}\n\n1.",
]

FREE_TEXT_STANDALONE = [
    "def merge_sorted(left, right):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n",
    "The train left the station at dawn, and for the first hour",
    "Ingredients:\n- 2 cups flour\n- 1 teaspoon salt\n",
    "Once upon a time, in a kingdom by the sea,",
    "The minutes of the town council meeting record that",
    "Welcome to the user guide. This section explains how to",
    "\"Are you sure this is the right address?\" she asked, looking up at",
    "SELECT name, COUNT(*) AS orders\nFROM customers\n",
    "The old lighthouse keeper had kept a logbook for forty years. On the first page",
    "Step 1: Preheat the oven.",
    "Weather forecast for the weekend:",
    "Letters to the editor\n\nSir, I write concerning",
]


def free_text_openings(seed: int = 0) -> list[str]:
    """Every opening x topic plus the standalone openings, shuffled deterministically (652 openings)."""
    openings = [opening.format(topic=topic, Topic=topic[0].upper() + topic[1:])
                for opening in FREE_TEXT_OPENINGS for topic in TOPICS] + FREE_TEXT_STANDALONE
    random.Random(seed).shuffle(openings)
    return openings
