"""``demo:dialogsum``: an embedded dialogue-summarisation data set, generated here (no third-party text).

``dialogsum_demo(n, seed)`` returns ``n`` records in the DialogSum schema
``{"id", "dialogue", "summary", "topic"}``: the dialogue is ``#Person1#: ...`` / ``#Person2#: ...``
turns joined by ``"\\n"``, the summary is one or two sentences that call the speakers
``#Person1#`` / ``#Person2#``, or by name when the dialogue says the name (as DialogSum does).
It is what ``--data demo:dialogsum`` loads: a task small enough to fine-tune on a CPU in minutes
that still needs the model to read the dialogue.

How it is generated. There are twelve scenario families (booking a table, rescheduling a
meeting, returning an item, asking directions, planning a trip, borrowing something, a doctor's
appointment, a job interview, birthday plans, ordering food, buying cinema tickets, viewing a
flat). A family draws its facts (names, days, times, places, items, prices, reasons) from the
pools below and those of ``common.py`` (names, cities), then writes the turns, picking one of
several phrasings per turn. Most families branch on a change of plan: the first proposal fails
(the time is booked, the item is out of stock, the city is too expensive ...) and the speakers
settle on another. Some dialogues open with two turns of small talk that the summary ignores.

How summaries are derived. Each family writes its summary from the same facts it used for the
turns, after the branch is taken: who (``#Person1#`` and the named speaker), what, when and
where, and the *final* decision, with the reason for a change of plan. So every name, day,
place and number in a summary appears in its dialogue, and the summary cannot be guessed
without reading the dialogue (test: ``tests/test_demo_data.py``).

Size. Dialogues have 4-8 turns and 50-110 words (speaker tags included), summaries 12-35 words,
so a few hundred examples train in minutes on a CPU. A draw outside those bounds, or a dialogue
already produced, is rejected and drawn again.

Determinism. Example ``i`` is drawn from ``random.Random(f"dialogsum-demo:{seed}:{i}:{attempt}")``
and its family is ``i``-th in a seed-dependent rotation: the data depends only on ``(n, seed)``,
never on ``PYTHONHASHSEED``, and ``dialogsum_demo(100, s)`` is a prefix of ``dialogsum_demo(400, s)``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from peftlab.data.demo.common import CITIES, NAMES
from peftlab.errors import UserError

TURNS = (4, 8)
DIALOGUE_WORDS = (50, 110)
SUMMARY_WORDS = (12, 35)

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORKDAYS = DAYS[:5]
DAY_TIMES = ["9 am", "9:30 am", "10 am", "11 am", "11:30 am", "1 pm", "2 pm", "2:30 pm", "3 pm", "4 pm", "4:30 pm"]
EVENING_TIMES = ["6 pm", "6:30 pm", "7 pm", "7:30 pm", "8 pm", "8:30 pm", "9 pm"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
COUNTS = ["two", "three", "four", "five", "six"]
STREETS = ["Elm Street", "Park Road", "Queen Street", "Mill Lane", "Harbour Road", "Station Road", "Church Street",
           "Willow Avenue", "Bridge Street", "Market Lane"]  # fmt: skip

# Two turns of small talk before the request: (#Person1#, #Person2#).
FRIEND_SMALL_TALK = [
    ("Hi {name}! How was your weekend?", "Pretty quiet, thanks. I finally finished my book. What's up?"),
    ("Morning, {name}. Did you get home all right in that rain?",
     "Just about, I was soaked! Anyway, what's on your mind?"),
    ("Hey {name}, how's the new flat?", "Still full of boxes, but I love it. What can I do for you?"),
    ("{name}, hi! Are you feeling better today?", "Much better, thanks for asking. What's going on?"),
    ("Hi {name}, nice haircut!", "Oh, thank you! I tried the new place on the corner. What do you need?"),
]  # fmt: skip
SERVICE_SMALL_TALK = [
    ("Good morning! Busy day today?", "Quite busy, yes. How can I help you?"),
    ("Hello! Lovely weather today, isn't it?", "It really is. What can I do for you?"),
    ("Hi there, sorry, I'm a bit out of breath.", "No hurry at all. How can I help?"),
]


_SENTENCE_START = re.compile(r"(?:^|(?<=[.!?] ))[a-z]")


class _Writer:
    """Collects the facts, turns (``#Person1#`` first, alternating) and summary of one dialogue."""

    def __init__(self, rng: random.Random, topic: str, **facts: str):
        self.rng, self.topic, self.facts, self.turns = rng, topic, facts, []

    def fill(self, text: str) -> str:
        """The text with its facts filled in and each sentence capitalised."""
        return _SENTENCE_START.sub(lambda m: m.group(0).upper(), text.format(**self.facts))

    def say(self, *options: str) -> None:
        self.turns.append(self.fill(self.rng.choice(options)))

    def open(self, greeted: list[str], plain: list[str], small_talk: list[tuple[str, str]] | None) -> None:
        """#Person1#'s request, after two turns of small talk in about a third of the dialogues."""
        if small_talk and self.rng.random() < 0.35:
            first, second = self.rng.choice(small_talk)
            self.turns += [self.fill(first), self.fill(second)]
            self.say(*plain)
        else:
            self.say(*greeted)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def summary(self, *options: str) -> tuple[str, list[str], str]:
        return self.topic, self.turns, self.fill(self.rng.choice(options))


# ------------------------------------------------------------------------------------- families
# Each family: rng -> (topic, turns, summary).

RESTAURANTS = ["the Blue Lantern", "Casa Verde", "the Golden Wok", "Saffron House", "the Harbour Grill",
               "the Green Fig", "Bella Notte", "the Red Door Bistro"]  # fmt: skip
TABLE_REQUESTS = [
    ("Could we sit by the window?", "asks for a window table"),
    ("One of us is vegetarian, is that all right?", "mentions a vegetarian guest"),
    ("We'll need a high chair for a baby.", "asks for a high chair"),
    ("It's my mother's birthday, by the way.", "mentions a birthday"),
]


def _book_table(rng: random.Random):
    time1, time2 = rng.sample(EVENING_TIMES, 2)
    request, request_sum = rng.choice(TABLE_REQUESTS)
    w = _Writer(rng, "book a table", restaurant=rng.choice(RESTAURANTS), size=rng.choice(COUNTS),
                day=rng.choice(DAYS), time1=time1, time2=time2, name=rng.choice(NAMES),
                request=request, request_sum=request_sum)  # fmt: skip
    w.open(
        ["Hello, is this {restaurant}? I'd like to book a table for {size} on {day}.",
         "Good afternoon. Could I book a table for {size} at {restaurant} on {day}, please?"],
        ["I'd like to book a table for {size} at {restaurant} on {day}, please."],
        SERVICE_SMALL_TALK,
    )  # fmt: skip
    w.say("Certainly. What time would you like?", "Of course. For what time?", "Sure. What time were you thinking of?")
    w.say("{time1}, if possible.", "Around {time1}, please.", "Would {time1} be possible?")
    if w.chance(0.55):
        w.say("I'm sorry, {time1} is fully booked. I could offer you {time2}.",
              "Unfortunately we're full at {time1}. Would {time2} work instead?")  # fmt: skip
        w.say("OK, {time2} is fine then. The name is {name}.", "All right. Please put it under {name}.")
        w.say("Done: a table for {size} on {day} at {time2}, under {name}. See you then!",
              "All set, {name}. We look forward to seeing you at {time2}.")  # fmt: skip
        return w.summary(
            "#Person1# books a table for {size} at {restaurant} on {day} at {time2} under the name {name}, "
            "because {time1} is fully booked.",
            "#Person1# wants a table for {size} at {restaurant} on {day} at {time1}, but it is full, "
            "so #Person1# books {time2} under {name}.",
        )
    w.say("Yes, {time1} is available. May I have your name?", "We have a table free at {time1}. What name is it under?")
    w.say("It's {name}. {request}", "{name}. {request}")
    w.say("No problem, I've made a note of it. See you on {day}.", "Of course, that's noted. Thank you, {name}.")
    return w.summary(
        "#Person1# books a table for {size} at {restaurant} on {day} at {time1} under the name {name} "
        "and {request_sum}.",
    )


MEETINGS = ["project review", "budget meeting", "weekly check-in", "client call", "design review",
            "training session", "planning meeting"]  # fmt: skip
CLASHES = [
    ("I have a dentist appointment then", "#Person1# has a dentist appointment"),
    ("I'll be on a train to the head office that day", "#Person1# is travelling to the head office"),
    ("I have to pick my daughter up from school", "#Person1# must pick up #Person1#'s daughter"),
    ("a client visit was just booked at the same time", "a client visit clashes with it"),
    ("I'll be at a training course all day", "#Person1# has a training course"),
    ("the meeting room is being painted that week", "the meeting room is being painted"),
]


def _reschedule(rng: random.Random):
    day1, day2, day3 = rng.sample(WORKDAYS, 3)
    time1, time2, time3 = rng.sample(DAY_TIMES, 3)
    clash, clash_sum = rng.choice(CLASHES)
    w = _Writer(rng, "reschedule a meeting", name=rng.choice(NAMES), meeting=rng.choice(MEETINGS), day1=day1,
                day2=day2, day3=day3, time1=time1, time2=time2, time3=time3, clash=clash,
                clash_sum=clash_sum)  # fmt: skip
    w.open(
        ["Hi {name}, do you have a minute? It's about our {meeting} on {day1} at {time1}.",
         "{name}, sorry to bother you. Can we talk about the {meeting} on {day1} at {time1}?"],
        ["It's about our {meeting} on {day1} at {time1}.", "Listen, about the {meeting} on {day1} at {time1}."],
        FRIEND_SMALL_TALK,
    )  # fmt: skip
    w.say("Sure, is there a problem?", "Yes, what about it?", "Of course. Has something come up?")
    w.say("I can't make it, {clash}. Could we move it?", "Unfortunately {clash}. Can we find another time?")
    w.say("How about {day2} at {time2}?", "I'm free on {day2} at {time2}. Would that suit you?")
    if w.chance(0.5):
        w.say("{day2} is no good for me either. What about {day3} at {time3}?",
              "Hmm, I'm busy all {day2}. Could we do {day3} at {time3} instead?")  # fmt: skip
        w.say("{day3} at {time3} works for me. I'll update the invitation.",
              "Fine, {day3} at {time3}. I'll tell the others.")  # fmt: skip
        w.facts.update(day=day3, time=time3)
    else:
        w.say("Perfect, {day2} at {time2} it is. I'll send a new invitation.",
              "That works. Thanks for being flexible, {name}.")  # fmt: skip
        if w.chance(0.5):
            w.say("No problem. See you then.", "Any time. See you on {day2}.")
        w.facts.update(day=day2, time=time2)
    return w.summary(
        "#Person1# and {name} move their {meeting} from {day1} to {day} at {time} because {clash_sum}.",
        "Because {clash_sum}, #Person1# asks {name} to move the {meeting}; "
        "they agree on {day} at {time} instead of {day1}.",
    )


ITEMS = {
    "kettle": ["stopped working after two days", "leaks from the bottom"],
    "pair of headphones": ["only plays sound on one side", "stopped charging"],
    "blender": ["makes a burning smell", "has a cracked jug"],
    "desk lamp": ["flickers all the time", "arrived with a broken switch"],
    "rain jacket": ["has a broken zip", "lets the rain through"],
    "toaster": ["burns the bread on one side", "stopped working after a week"],
    "backpack": ["has a broken strap", "has a hole in the bottom"],
    "coffee grinder": ["stopped working after three days", "is far too loud"],
}
PRICES = ["15", "19", "24", "29", "35", "39", "45", "49", "59", "65", "79"]


def _return_item(rng: random.Random):
    item = rng.choice(list(ITEMS))
    day, day2 = rng.sample(DAYS, 2)
    w = _Writer(rng, "return an item", item=item, defect=rng.choice(ITEMS[item]), day=day, day2=day2,
                price=rng.choice(PRICES))  # fmt: skip
    w.open(
        ["Hello, I bought this {item} here on {day} and it {defect}.",
         "Hi, I'd like to return this {item}. I got it last {day} and it {defect}."],
        ["I bought this {item} here on {day} and it {defect}."],
        SERVICE_SMALL_TALK,
    )  # fmt: skip
    w.say("I'm sorry about that. Do you have the receipt?", "Oh dear. Have you got your receipt with you?")
    case = rng.choice(["refund", "no receipt", "out of stock"])
    if case == "refund":
        w.say("Yes, here it is. I'd like my money back, please.", "Here you go. Could I have a refund?")
        w.say("Of course. That's {price} dollars back on your card.",
              "No problem, I've refunded the {price} dollars to your card.")  # fmt: skip
        if w.chance(0.5):
            w.say("Great, thanks for making it so easy.", "Thank you, that was quick.")
        return w.summary(
            "#Person1# returns a {item} bought on {day} that {defect} and, "
            "having the receipt, gets a refund of {price} dollars.",
            "#Person1#'s {item} {defect}, so #Person1# brings it back with "
            "the receipt and gets {price} dollars refunded.",
        )
    if case == "no receipt":
        w.say("I'm afraid I lost it. Can I still get a refund?",
              "I can't find it anywhere. Is a refund still possible?")  # fmt: skip
        w.say("Without a receipt I can only offer an exchange or store credit.",
              "Sorry, no refunds without a receipt, but I can exchange it or give you store credit.")  # fmt: skip
        if w.chance(0.5):
            w.say("Then I'll exchange it for a new one, please.", "An exchange is fine, as long as the new one works.")
            w.say("Here's a new {item}. Let me test it for you first.", "Here you are, a brand new {item}.")
            return w.summary(
                "#Person1# wants a refund for a {item} that {defect} but has "
                "lost the receipt, so #Person1# exchanges it.",
            )
        w.say("Store credit is fine, I'll find something else.", "I'll take the store credit then.")
        w.say("Here's a voucher for {price} dollars.", "Here you go, {price} dollars of store credit.")
        return w.summary(
            "#Person1# has no receipt for a {item} that {defect}, so instead of a refund #Person1# gets "
            "{price} dollars of store credit.",
        )
    w.say("Yes, here. Could I swap it for a new one?", "Here it is. I'd just like a new one, please.")
    w.say("I'm afraid we're out of stock until {day2}.", "Sorry, we won't have any more until {day2}.")
    w.say("Then I'd rather have a refund, please.", "I can't wait that long. Can I get my money back instead?")
    w.say("Certainly, {price} dollars back on your card.", "Of course. I've refunded {price} dollars.")
    return w.summary(
        "#Person1# wants to exchange a {item} that {defect}, but none are in stock until {day2}, "
        "so #Person1# takes a refund of {price} dollars.",
    )


DESTINATIONS = ["the train station", "the city museum", "the post office", "the central library", "the town hall",
                "the sports centre", "the old cathedral", "the Riverside Market"]  # fmt: skip
LANDMARKS = ["the bakery", "the bank", "the cinema", "the petrol station", "the big roundabout", "the fire station",
             "the second traffic light"]  # fmt: skip


def _directions(rng: random.Random):
    w = _Writer(rng, "ask for directions", dest=rng.choice(DESTINATIONS), street=rng.choice(STREETS),
                landmark=rng.choice(LANDMARKS), turn=rng.choice(["left", "right"]),
                minutes=rng.choice(["10", "15", "20", "25", "30"]), bus=str(rng.randint(3, 99)))  # fmt: skip
    w.say("Excuse me, could you tell me how to get to {dest}?", "Sorry to bother you, do you know the way to {dest}?",
          "Excuse me, I'm a bit lost. Where is {dest} from here?")  # fmt: skip
    w.say("Sure. Go straight down {street} and turn {turn} at {landmark}.",
          "Yes, walk along {street} until you reach {landmark}, then turn {turn}.")  # fmt: skip
    w.say("Is it far from there?", "How long does that take on foot?", "Is it a long walk?")
    w.say("About {minutes} minutes on foot.", "It's roughly a {minutes}-minute walk from here.")
    if w.chance(0.6):
        w.say("That's quite far with this suitcase. Is there a bus?", "My knee is sore today. Can I get a bus instead?")
        w.say("Yes, bus {bus} stops just over there and goes right to {dest}.",
              "Take bus {bus} from the stop across the road. It stops outside {dest}.")  # fmt: skip
        w.say("Great, I'll take the bus then. Thanks a lot!", "Perfect, bus {bus} it is. Thank you!")
        return w.summary(
            "#Person1# asks the way to {dest}. It is a {minutes}-minute walk along {street}, so #Person1# "
            "decides to take bus {bus} instead.",
            "#Person2# explains how to walk to {dest} via {street}, but as it takes {minutes} minutes, "
            "#Person1# will take bus {bus}.",
        )
    w.say("That's fine, I'll walk. So I turn {turn} at {landmark}?", "I'll walk then. {landmark}, then {turn}, right?")
    w.say("Exactly. You can't miss it.", "That's right. Enjoy your walk!")
    return w.summary(
        "#Person2# tells #Person1# how to reach {dest}: go along {street}, turn {turn} at {landmark}, "
        "and walk about {minutes} minutes.",
    )


TRIP_PROBLEMS = [
    ("the hotels there are really expensive in {month}", "the hotels in {city1} are too expensive then"),
    ("it rains almost every day there in {month}", "it rains a lot in {city1} in {month}"),
    ("all the flights to {city1} are fully booked", "flights to {city1} are fully booked"),
    ("there's a big festival there and everything is sold out", "a festival has sold out everything in {city1}"),
]


def _plan_trip(rng: random.Random):
    city1, city2 = rng.sample(CITIES, 2)
    month = rng.choice(MONTHS)
    problem, problem_sum = rng.choice(TRIP_PROBLEMS)
    facts = dict(city1=city1, city2=city2, month=month)
    w = _Writer(rng, "plan a trip", name=rng.choice(NAMES), days=rng.choice(["three", "four", "five", "six", "ten"]),
                transport=rng.choice(["train", "plane", "car", "coach"]), problem=problem.format(**facts),
                problem_sum=problem_sum.format(**facts), **facts)  # fmt: skip
    w.open(
        ["{name}, have you thought about where we should go in {month}?",
         "Hey {name}, shall we finally plan our trip for {month}?"],
        ["Have you thought about where we should go in {month}?", "So, shall we finally plan our trip for {month}?"],
        FRIEND_SMALL_TALK,
    )  # fmt: skip
    w.say("I was thinking of {city1}. I've always wanted to see it.",
          "What about {city1}? My cousin says it's wonderful.")  # fmt: skip
    if w.chance(0.6):
        w.say("I looked it up yesterday, but {problem}.", "I checked, and unfortunately {problem}.")
        w.say("Oh no. Then how about {city2}? We could go by {transport}.",
              "Fair enough. {city2} is lovely too, and we could take the {transport}.")  # fmt: skip
        w.say("Good idea! Let's stay {days} days.", "I love that. {days} days would be perfect.")
        w.say("Great, I'll look at tickets tonight.", "Deal. I'll check the prices this evening.")
        return w.summary(
            "#Person1# and {name} plan a {days}-day trip to {city2} by {transport} in {month}, because {problem_sum}.",
            "{name} suggests {city1} for their {month} trip, but {problem_sum}, so they choose {days} days in "
            "{city2}, travelling by {transport}.",
        )
    w.say("Great choice! I've heard the food there is amazing. How should we get there?",
          "Sounds good to me, I've never been. How would we get there?")  # fmt: skip
    w.say("The {transport} is probably cheapest. Maybe {days} days?", "Let's go by {transport}. {days} days, maybe?")
    w.say("{days} days sounds perfect. I'll look for a hotel.", "Perfect. I'll find us a hotel near the centre.")
    return w.summary(
        "#Person1# and {name} agree to spend {days} days in {city1} in {month}, travelling by {transport}; "
        "#Person1# will look for a hotel.",
    )


BORROWABLE = [
    ("ladder", "to clean my gutters", "to clean the gutters"),
    ("drill", "to put up some shelves", "to put up shelves"),
    ("tent", "for a camping weekend", "for a camping weekend"),
    ("camera", "for my cousin's wedding", "for a cousin's wedding"),
    ("bike", "while my car is being repaired", "while #Person1#'s car is repaired"),
    ("suitcase", "for my trip next week", "for a trip"),
    ("lawnmower", "because mine broke", "because #Person1#'s broke"),
    ("projector", "for a film night", "for a film night"),
]


def _borrow(rng: random.Random):
    item, purpose, purpose_sum = rng.choice(BORROWABLE)
    first, second = sorted(rng.sample(range(1, 7), 2))  # the early return day comes before the planned one
    w = _Writer(rng, "borrow something", name=rng.choice(NAMES), item=item, purpose=purpose,
                purpose_sum=purpose_sum, day0=DAYS[first], day1=DAYS[second])  # fmt: skip
    w.open(
        ["Hi {name}, could I borrow your {item} {purpose}?",
         "{name}, sorry to ask, but could I borrow your {item}? I need it {purpose}."],
        ["Could I borrow your {item} {purpose}?",
         "I was wondering if I could borrow your {item}. I need it {purpose}."],
        FRIEND_SMALL_TALK,
    )  # fmt: skip
    w.say("Sure. When would you bring it back?", "Of course. How long do you need it for?")
    w.say("I'd return it on {day1}, if that's OK.", "Until {day1}, if that's all right with you.")
    if w.chance(0.5):
        w.say("Hmm, I need it myself on {day1}. Could you bring it back by {day0} evening?",
              "Ah, I'm using it on {day1}. Can I have it back on {day0}?")  # fmt: skip
        w.say("No problem, {day0} evening it is.", "Of course, I'll drop it off on {day0}.")
        w.say("Great. It's in the garage, I'll go and get it.", "Thanks. Give me a minute to find it.")
        return w.summary(
            "{name} lends #Person1# a {item} {purpose_sum}, and #Person1# will return it on {day0} "
            "because {name} needs it on {day1}.",
        )
    w.say("{day1} is fine. Just be careful, it's quite new.", "That's fine. Be careful with it, it was a present.")
    w.say("I will. Thanks a lot, {name}, I owe you one.", "Don't worry, I'll look after it. Thanks, {name}!")
    return w.summary(
        "{name} lends #Person1# a {item} {purpose_sum}, and #Person1# promises to bring it back on {day1}.",
    )


DOCTORS = ["Patel", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Herrera", "Novak", "Mensah", "Fischer", "Costa"]
SYMPTOMS = [
    ("a sore throat", "a sore throat"),
    ("pain in my lower back", "lower back pain"),
    ("a rash on my arm", "a rash on the arm"),
    ("bad headaches", "bad headaches"),
    ("a swollen ankle", "a swollen ankle"),
    ("an earache", "an earache"),
    ("a cough that won't go away", "a persistent cough"),
]
CONFLICTS = [
    ("I'm at work then", "#Person1# is at work"),
    ("I have an exam that morning", "#Person1# has an exam"),
    ("I have a job interview then", "#Person1# has a job interview"),
    ("I'm looking after my nephew then", "#Person1# is babysitting"),
]


def _doctor(rng: random.Random):
    symptom, symptom_sum = rng.choice(SYMPTOMS)
    conflict, conflict_sum = rng.choice(CONFLICTS)
    day1, day2 = rng.sample(WORKDAYS, 2)
    time1, time2 = rng.sample(DAY_TIMES, 2)
    w = _Writer(rng, "see a doctor", doc=rng.choice(DOCTORS), name=rng.choice(NAMES), symptom=symptom,
                symptom_sum=symptom_sum, duration=rng.choice(["three days", "a week", "two weeks", "a month"]),
                conflict=conflict, conflict_sum=conflict_sum, day1=day1, day2=day2, time1=time1,
                time2=time2)  # fmt: skip
    w.open(
        ["Hello, I'd like to make an appointment with Dr. {doc}. I've had {symptom} for {duration}.",
         "Good morning. Could I see Dr. {doc} soon? I've had {symptom} for {duration}."],
        ["I'd like to see Dr. {doc}, please. I've had {symptom} for {duration}."],
        SERVICE_SMALL_TALK,
    )  # fmt: skip
    w.say("Certainly. Dr. {doc} is free on {day1} at {time1}.", "Let me check. The first opening is {day1} at {time1}.")
    if w.chance(0.6):
        w.say("{conflict}. Is there anything else?", "Oh, {conflict}. Do you have another time?")
        w.say("There's a slot on {day2} at {time2}.", "How about {day2} at {time2}?")
        w.say("That's better, I'll take it. My name is {name}.", "Yes, that works. It's {name}, by the way.")
        w.say("Done, {name}. Please come ten minutes early.", "Booked, {name}. Bring your insurance card, please.")
        return w.summary(
            "#Person1# has had {symptom_sum} for {duration} and books Dr. {doc} for {day2} at {time2}, "
            "because {conflict_sum} on {day1}.",
        )
    w.say("That's fine. Should I bring anything?", "Perfect, I'll take it. Do I need to bring anything?")
    w.say("Just your insurance card. May I have your name?", "Only your insurance card. And your name, please?")
    w.say("It's {name}. Thank you so much.", "My name is {name}. Thanks for your help.")
    return w.summary(
        "#Person1#, who has had {symptom_sum} for {duration}, books an "
        "appointment with Dr. {doc} on {day1} at {time1}.",
    )


ROLES = ["sales assistant", "junior accountant", "web developer", "nurse", "chef", "graphic designer",
         "warehouse supervisor", "receptionist", "lab technician"]  # fmt: skip
COMPANIES = ["Northgate Logistics", "Brightside Media", "Green Valley School", "Harbor Tech", "Sunrise Hotel",
             "Maple Clinic", "Blue Peak Foods", "Cobalt Studio"]  # fmt: skip
STRENGTHS = [
    ("I stay calm under pressure", "staying calm under pressure"),
    ("I'm very organised", "being organised"),
    ("I learn new tools quickly", "learning quickly"),
    ("I'm good with customers", "working with customers"),
]


def _interview(rng: random.Random):
    strength, strength_sum = rng.choice(STRENGTHS)
    day1, day2 = rng.sample(WORKDAYS, 2)
    w = _Writer(rng, "job interview", name=rng.choice(NAMES), role=rng.choice(ROLES), company=rng.choice(COMPANIES),
                years=rng.choice(["two", "three", "four", "five", "six"]), strength=strength,
                strength_sum=strength_sum, day1=day1, day2=day2)  # fmt: skip
    w.say("Good morning, {name}. Thanks for coming in. Why do you want to work here as a {role}?",
          "Welcome, {name}. Please tell me a little about your experience as a {role}.")  # fmt: skip
    w.say("I've been a {role} at {company} for {years} years, and I'm ready for a new challenge.",
          "I've worked at {company} as a {role} for {years} years, and I'd like to grow.")  # fmt: skip
    w.say("What would you say is your main strength?", "And what are you best at?")
    w.say("I'd say {strength}.", "Honestly, {strength}. My manager says so too.")
    w.say("Good. We'd like you to come back on {day1} to meet the team.",
          "Thank you, {name}. Could you come back on {day1} for a second interview?")  # fmt: skip
    if w.chance(0.5):
        w.say("I'm sorry, I'm away on {day1}. Could we make it {day2}?",
              "I can't on {day1}, I'm afraid. Is {day2} possible?")  # fmt: skip
        w.say("Of course, {day2} it is.", "Yes, {day2} is fine. See you then.")
        w.facts["day"] = day2
    else:
        w.say("{day1} is perfect. Thank you!", "Wonderful, I'll be there on {day1}.")
        w.facts["day"] = day1
    return w.summary(
        "{name} interviews for a {role} job, mentions {years} years at {company} and {strength_sum}, "
        "and is invited back on {day}.",
        "#Person1# interviews {name}, a {role} with {years} years at {company}, and asks {name} to return on {day}.",
    )


VENUES = ["the Luna Café", "Pepper & Pine", "the Corner Bistro", "the Jade Garden", "Bowling Palace"]
PARKS = ["Willow Park", "Riverside Park", "the botanical garden", "Hilltop Park"]
GIFTS = ["a new scarf", "concert tickets", "a cookbook", "a board game", "a fancy plant", "a watercolour set"]


def _birthday(rng: random.Random):
    name, friend = rng.sample(NAMES, 2)
    park = rng.choice(PARKS)
    w = _Writer(rng, "birthday plans", name=name, friend=friend, day=rng.choice(DAYS), venue=rng.choice(VENUES),
                gift=rng.choice(GIFTS), time=rng.choice(EVENING_TIMES), park=park)  # fmt: skip
    w.open(
        ["{name}, did you remember that {friend}'s birthday is on {day}?",
         "Hey {name}, it's {friend}'s birthday on {day}. Should we plan something?"],
        ["Did you remember that {friend}'s birthday is on {day}?"],
        FRIEND_SMALL_TALK,
    )  # fmt: skip
    w.say("Of course! How about a surprise dinner at {venue}?", "Yes! Let's book {venue} and surprise {friend}.")
    if w.chance(0.6):
        closed = rng.choice([("{venue} is closed that week", "closed that week"),
                             ("{venue} is fully booked on {day}", "fully booked")])  # fmt: skip
        w.facts.update(closed=closed[0].format(**w.facts), closed_sum=closed[1])
        w.say("I thought of that too, but {closed}.", "I called them this morning, and {closed}.")
        if w.chance(0.5):
            w.say("Then let's have a picnic in {park} instead.", "Oh. What about a picnic in {park}?")
            w.facts["event"] = f"picnic in {park}"
        else:
            w.say("Then let's have a party at my place instead.", "Oh. What about a small party at my place?")
            w.facts["event"] = f"party at {name}'s place"
        w.say("Perfect. I'll bake a cake. Can you get the present?",
              "Great idea. I'll make a cake if you buy the gift.")  # fmt: skip
        w.say("Sure, I'll get {gift}. {friend} will love it.", "Deal. I'm thinking {gift}.")
        return w.summary(
            "#Person1# and {name} plan a surprise {event} for {friend}'s birthday on {day}, since {venue} is "
            "{closed_sum}; {name} will get {gift}.",
        )
    w.say("Good idea, {friend} loves that place. What should we give as a present?",
          "Perfect, I'll invite the others. What about a present?")  # fmt: skip
    w.say("Maybe {gift}? I can pick it up.", "I'll get {gift}. Can you book the table?")
    w.say("Great. I'll book a table for {time}.", "Sure, I'll reserve it for {time}.")
    return w.summary(
        "#Person1# and {name} plan a surprise dinner for {friend}'s birthday at {venue} on {day} at {time}; "
        "{name} will get {gift}.",
    )


MENUS = {
    "Mario's Pizzeria": [("a margherita pizza", "margherita"), ("a pepperoni pizza", "pepperoni"),
                         ("a lasagne", "lasagne")],
    "Dragon Noodle Bar": [("beef noodles", "beef noodles"), ("some spring rolls", "spring rolls"),
                          ("a chicken chow mein", "chow mein")],
    "Spice Route": [("a chicken curry", "chicken curry"), ("a lamb biryani", "biryani"),
                    ("a vegetable korma", "korma")],
    "Taco Corner": [("three chicken tacos", "chicken tacos"), ("a bean burrito", "burrito"),
                    ("a plate of nachos", "nachos")],
    "Sakura Sushi": [("a salmon sushi set", "salmon sushi"), ("a bowl of miso ramen", "ramen"),
                     ("some tuna rolls", "tuna rolls")],
}  # fmt: skip
DRINKS = ["a lemonade", "a cola", "an iced tea", "a bottle of water", "a ginger beer"]


def _order_food(rng: random.Random):
    # Here #Person1# works at the restaurant and #Person2# orders.
    shop = rng.choice(list(MENUS))
    (dish1, bare1), (dish2, bare2) = rng.sample(MENUS[shop], 2)
    w = _Writer(rng, "order food", shop=shop, dish1=dish1, bare1=bare1, dish2=dish2, bare2=bare2,
                drink=rng.choice(DRINKS), number=str(rng.randint(2, 240)), street=rng.choice(STREETS),
                minutes=rng.choice(["20", "25", "30", "35", "40", "45"]), price=rng.choice(PRICES[:6]))  # fmt: skip
    w.say("Good evening, {shop}. What can I get you?", "Thanks for calling {shop}. How can I help?")
    w.say("Hi, I'd like {dish1} and {drink} for delivery, please.", "Hello. Could I order {dish1} and {drink}, please?")
    if w.chance(0.6):
        w.say("Sorry, we've run out of {bare1} tonight. Could I suggest {dish2}?",
              "I'm afraid the {bare1} is sold out. How about {dish2}?")  # fmt: skip
        w.say("Fine, {dish2} then.", "Oh well. Yes, I'll have the {bare2}.")
        w.facts.update(dish=dish2, why=f", since there is no {bare1} left")
    else:
        w.say("Of course. Anything else?", "Sure. Would you like anything else?")
        w.say("No, that's all, thanks.", "No thanks, that's everything.")
        w.facts.update(dish=dish1, why="")
    w.say("What's the delivery address?", "And where should we deliver it?")
    w.say("{number} {street}, the blue door.", "It's {number} {street}, top floor.")
    w.say("It'll be there in about {minutes} minutes. That's {price} dollars.",
          "That's {price} dollars, ready in {minutes} minutes.")  # fmt: skip
    return w.summary(
        "#Person2# orders {dish} and {drink} from {shop} to {number} {street}{why}; it costs {price} dollars "
        "and takes {minutes} minutes.",
    )


FILMS = ["The Silent Harbour", "Midnight Orchard", "Paper Moons", "The Last Lighthouse", "Seven Winters",
         "A Map of Small Things", "The Clockmaker's Daughter"]  # fmt: skip
SEATS = [("Near the back, please.", "near the back"), ("In the middle, if possible.", "in the middle"),
         ("Close to the aisle, please.", "by the aisle")]  # fmt: skip


def _tickets(rng: random.Random):
    time1, time2 = rng.sample(EVENING_TIMES, 2)
    count = rng.choice(["two", "three", "four"])
    seat, seat_sum = rng.choice(SEATS)
    w = _Writer(rng, "buy tickets", film=rng.choice(FILMS), count=count, time1=time1, time2=time2,
                row=rng.choice("DEFGHK"), seat=seat, seat_sum=seat_sum,
                total=str({"two": 2, "three": 3, "four": 4}[count] * rng.choice([9, 11, 12, 14])))  # fmt: skip
    w.open(
        ["Hi, {count} tickets for {film} at {time1}, please.",
         "Hello, are there seats left for {film} at {time1}? We need {count}."],
        ["Could I have {count} tickets for {film} at {time1}?"],
        SERVICE_SMALL_TALK,
    )  # fmt: skip
    if w.chance(0.6):
        w.say("I'm sorry, the {time1} show is sold out. There are seats at {time2}.",
              "That one's full, I'm afraid. The next show is at {time2}.")  # fmt: skip
        w.say("Then we'll take {time2}. Can we sit together?", "OK, {time2} then. Together, if possible.")
        w.say("Yes, {count} seats together in row {row}. That's {total} dollars.",
              "Row {row} has {count} seats together. {total} dollars, please.")  # fmt: skip
        w.say("Here you are. Where can I buy popcorn?", "Here you go. Thanks for your help!")
        return w.summary(
            "#Person1# buys {count} tickets for {film} at {time2} in row {row} for {total} dollars, "
            "since the {time1} show is sold out.",
        )
    w.say("Yes, there are seats left. Where would you like to sit?", "No problem. Where would you like to sit?")
    w.say("{seat}", "Hmm. {seat}")
    w.say("Row {row} then. That's {total} dollars.", "Row {row} it is. {total} dollars, please.")
    w.say("Can I pay by card?", "Here you are. Do you take cards too, for the snacks later?")
    w.say("Of course. Enjoy the film!", "Yes, we take all cards. Enjoy the show!")
    return w.summary(
        "#Person1# buys {count} tickets for {film} at {time1} and sits "
        "{seat_sum} in row {row}, paying {total} dollars.",
    )


AGENCIES = ["Keystone Lettings", "Oak Tree Homes", "Cityview Rentals", "Hearth Property"]
FLAT_QUESTIONS = [
    ("Are pets allowed? I have a cat.", "Small pets are fine.", "a cat is allowed"),
    ("Is there any parking?", "Yes, one parking space comes with it.", "a parking space is included"),
    ("Is it furnished?", "It's unfurnished, but the kitchen is fitted.", "it is unfurnished"),
]


def _flat_viewing(rng: random.Random):
    # #Person1# is the letting agent who answers; #Person2# calls about the flat.
    day1, day2 = rng.sample(DAYS[:6], 2)
    question, answer, answer_sum = rng.choice(FLAT_QUESTIONS)
    w = _Writer(rng, "rent a flat", name=rng.choice(NAMES), agency=rng.choice(AGENCIES), street=rng.choice(STREETS),
                rooms=rng.choice(["one-bedroom", "two-bedroom", "three-bedroom"]),
                rent=rng.choice(["850", "900", "1,100", "1,250", "1,400", "1,600"]), day1=day1, day2=day2,
                time=rng.choice(DAY_TIMES), question=question, answer=answer, answer_sum=answer_sum)  # fmt: skip
    w.say("{agency}, {name} speaking.", "Good morning, {agency}. This is {name}.")
    w.say("Hi, I'm calling about the {rooms} flat on {street}. Is it still available?",
          "Hello, is the {rooms} flat on {street} still free?")  # fmt: skip
    w.say("Yes, it is. It's {rent} dollars a month, bills not included.", "It is. The rent is {rent} dollars a month.")
    w.say("Could I see it on {day1}?", "Great. Can I come and see it on {day1}?")
    if w.chance(0.6):
        w.say("{day1} is fully booked, I'm afraid. How about {day2} at {time}?",
              "Sorry, I'm out all {day1}. Would {day2} at {time} work?")  # fmt: skip
        w.facts["day"] = day2
    else:
        w.say("Sure, {day1} at {time} is free.", "Yes, I can show it to you on {day1} at {time}.")
        w.facts["day"] = day1
    w.say("That works. {question}", "Perfect. {question}")
    w.say("{answer} See you on {day}.", "{answer} See you then.")
    return w.summary(
        "#Person2# calls {name} about the {rooms} flat on {street} for {rent} dollars a month and arranges a viewing "
        "on {day} at {time}; {answer_sum}.",
    )


FAMILIES: list[Callable[[random.Random], tuple[str, list[str], str]]] = [
    _book_table, _reschedule, _return_item, _directions, _plan_trip, _borrow,
    _doctor, _interview, _birthday, _order_food, _tickets, _flat_viewing,
]  # fmt: skip


# ----------------------------------------------------------------------------------------- public


def dialogsum_demo(n: int = 400, seed: int = 0) -> list[dict]:
    """``n`` generated DialogSum-style records ``{"id", "dialogue", "summary", "topic"}`` (see module docstring)."""
    if n < 1:
        raise UserError(f"the demo data set needs n >= 1 examples, got {n}")
    families = random.Random(f"dialogsum-demo-families:{seed}").sample(FAMILIES, len(FAMILIES))
    records, seen = [], set()
    for i in range(n):
        family = families[i % len(families)]
        for attempt in range(1000):
            topic, turns, summary = family(random.Random(f"dialogsum-demo:{seed}:{i}:{attempt}"))
            dialogue = "\n".join(f"#Person{1 + k % 2}#: {turn}" for k, turn in enumerate(turns))
            if dialogue not in seen and _within_bounds(turns, dialogue, summary):
                break
        else:  # a generator bug, not a user error: the bounds above cannot be met
            raise RuntimeError(f"{family.__name__} produced no dialogue within the length bounds")
        seen.add(dialogue)
        records.append({"id": f"demo_{i}", "dialogue": dialogue, "summary": summary, "topic": topic})
    return records


def _within_bounds(turns: list[str], dialogue: str, summary: str) -> bool:
    return (
        TURNS[0] <= len(turns) <= TURNS[1]
        and DIALOGUE_WORDS[0] <= len(dialogue.split()) <= DIALOGUE_WORDS[1]
        and SUMMARY_WORDS[0] <= len(summary.split()) <= SUMMARY_WORDS[1]
    )
