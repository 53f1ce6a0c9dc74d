"""``demo:qa``: reading comprehension with an extractive answer (template ``qa``).

``{"id", "context", "question", "answer"}``: four sentences about two people (job, city,
start time, how they travel to work, relation, pet and its name, hobby) and one question
about either; the answer is a span of the context, and both people have a job and a city, so
the question must be read to pick the right one.
"""

from __future__ import annotations

import random

from peftlab.data.demo.common import CITIES, NAMES, draw_records

JOBS = ["nurse", "baker", "pilot", "teacher", "plumber", "librarian", "chef", "gardener", "dentist", "architect",
        "journalist", "mechanic", "photographer", "pharmacist"]  # fmt: skip
TRANSPORT = ["by bike", "by bus", "on foot", "by car", "by train", "by tram", "by ferry"]
PETS = ["parrot", "cat", "dog", "tortoise", "rabbit", "goldfish", "hamster"]
PET_NAMES = ["Pip", "Biscuit", "Luna", "Mango", "Pepper", "Ziggy", "Clover", "Noodle", "Olive", "Basil"]
HOBBIES = ["plays the cello", "paints watercolours", "climbs at weekends", "sings in a choir", "grows tomatoes",
           "builds model ships", "plays chess online", "swims every morning"]  # fmt: skip
RELATIONS = ["brother", "sister", "neighbour", "best friend", "cousin"]
PRONOUNS = {"he": "his", "she": "her"}
FEMALE = {"Anna", "Diana", "Emma", "Grace", "Isabel", "Laura", "Mei", "Nora", "Priya", "Rosa", "Uma", "Wen", "Zoe",
          "Elena", "Hannah", "Julia", "Leila", "Nadia", "Paula", "Sofia", "Amara"}  # fmt: skip


def _qa(rng: random.Random) -> dict:
    a, b = rng.sample(NAMES, 2)
    he_a, he_b = ("she" if a in FEMALE else "he"), ("she" if b in FEMALE else "he")
    his_a, his_b = PRONOUNS[he_a], PRONOUNS[he_b]
    job_a, job_b = rng.sample(JOBS, 2)
    city_a, city_b = rng.sample(CITIES, 2)
    how, start = rng.choice(TRANSPORT), rng.choice(["6 am", "7 am", "8 am", "9 am", "10 am", "7:30 am", "8:30 am"])
    relation, pet, pet_name, hobby = rng.choice(RELATIONS), rng.choice(PETS), rng.choice(PET_NAMES), rng.choice(HOBBIES)
    context = " ".join([
        rng.choice([f"{a} is a {job_a} who lives in {city_a}.", f"{a} works as a {job_a} in {city_a}."]),
        rng.choice([f"{he_a.capitalize()} starts work at {start} and gets there {how}.",
                    f"Every day {he_a} travels to work {how} and starts at {start}."]),
        rng.choice([f"{his_a.capitalize()} {relation} {b} is a {job_b} in {city_b}.",
                    f"{b}, {his_a} {relation}, lives in {city_b} and works as a {job_b}."]),
        rng.choice([f"{b} has a {pet} called {pet_name} and {hobby}.",
                    f"In {his_b} free time {b} {hobby}; {he_b} also keeps a {pet} called {pet_name}."]),
    ])  # fmt: skip
    questions = [
        (f"What is {a}'s job?", job_a), (f"What does {b} do for a living?", job_b),
        (f"Where does {a} live?", city_a), (f"In which city does {b} live?", city_b),
        (f"What time does {a} start work?", start), (f"How does {a} get to work?", how),
        (f"Who is {a}'s {relation}?", b), (f"What is the name of {b}'s {pet}?", pet_name),
        (f"What kind of pet does {b} have?", pet),
    ]  # fmt: skip
    question, answer = rng.choice(questions)
    return {"context": context, "question": question, "answer": answer, "qa_key": f"{context}\n{question}"}


def qa_demo(n: int = 400, seed: int = 0) -> list[dict]:
    """``n`` reading-comprehension records ``{"id", "context", "question", "answer"}``; the answer is a span of the context."""
    records = draw_records("qa", n, seed, lambda rng, i: _qa(rng), key="qa_key")
    for r in records:
        del r["qa_key"]
    return records
