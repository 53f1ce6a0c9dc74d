"""``demo:reviews``: product reviews with a star rating (templates ``review_rating`` and ``sentiment``).

``{"id", "product", "text", "stars", "label"}``: a short product review (eight products,
three aspects each, a praise and a complaint phrasing per aspect), ``stars`` 1-5 (an int;
each block of five examples holds every rating once) and ``label`` negative (1-2 stars),
neutral (3) or positive (4-5). The rating fixes how many aspects are praised and criticised
(5: two praised; 4: two praised, "the only downside is ..."; 3: one of each; 2: two
criticised, "the only good thing is ..."; 1: two criticised) and the closing verdict, so the
rating is readable from the text but not from any one word.
"""

from __future__ import annotations

import random

from peftlab.data.demo.common import draw_records, rotation

# Product -> aspects; each aspect: (praise phrasings, complaint phrasings).

PRODUCTS: dict[str, list[tuple[list[str], list[str]]]] = {
    "headphones": [
        (["the sound is rich and clear", "the bass is deep without being muddy"],
         ["the sound is thin and tinny", "there is a constant hiss in the left ear"]),
        (["the battery lasts for days", "one charge gets me through a whole week"],
         ["the battery dies after two hours", "they take forever to charge"]),
        (["they are comfortable even after hours", "the ear cushions are soft"],
         ["they pinch my ears after twenty minutes", "the headband digs into my head"]),
    ],
    "kettle": [
        (["it boils water in about a minute", "it heats up really quickly"],
         ["it takes ages to boil", "it needs five minutes for one cup"]),
        (["it is pleasantly quiet", "it hardly makes a sound"],
         ["it is incredibly loud", "it rattles like an old engine"]),
        (["the lid opens with one hand", "the spout pours without dripping"],
         ["the lid is stiff and hard to open", "it drips every time I pour"]),
    ],
    "backpack": [
        (["there are pockets for everything", "the laptop sleeve is well padded"],
         ["there are hardly any pockets", "the laptop sleeve is too small"]),
        (["the straps stay comfortable on long walks", "the back panel keeps me cool"],
         ["the straps cut into my shoulders", "it makes my back sweaty"]),
        (["the zips are smooth and sturdy", "the fabric kept everything dry in the rain"],
         ["a zip broke in the first week", "the fabric soaks through in light rain"]),
    ],
    "desk lamp": [
        (["the light is bright and even", "the colour of the light is warm and pleasant"],
         ["the light flickers constantly", "the light is harsh and uneven"]),
        (["the arm stays exactly where I put it", "the base is heavy and steady"],
         ["the arm droops after a few minutes", "it wobbles whenever I type"]),
        (["the dimmer works smoothly", "the touch switch is handy"],
         ["the dimmer only has two settings", "the switch stopped responding"]),
    ],
    "running shoes": [
        (["they are light and well cushioned", "my knees feel fine after long runs"],
         ["they feel heavy and stiff", "my knees ache after every run"]),
        (["the grip is great on wet roads", "the soles still look new"],
         ["they slip on wet pavement", "the soles wore through in a month"]),
        (["they fit perfectly out of the box", "there was no breaking-in period"],
         ["they run a full size small", "they gave me blisters straight away"]),
    ],
    "coffee grinder": [
        (["the grind is very even", "it handles both espresso and filter well"],
         ["the grind is all over the place", "it cannot grind fine enough for espresso"]),
        (["it is easy to clean", "the parts come apart easily for cleaning"],
         ["it is a pain to clean", "coffee dust gets everywhere"]),
        (["it is surprisingly quiet", "it is fast and quiet"],
         ["it is painfully loud", "it overheats after a few grinds"]),
    ],
    "phone case": [
        (["it survived several drops without a scratch", "it protects the camera well"],
         ["my phone cracked on the first drop", "it leaves the camera exposed"]),
        (["it is slim and feels good in the hand", "the grip is just right"],
         ["it is bulky and slippery", "it makes the phone twice as thick"]),
        (["the buttons are easy to press", "the cut-outs line up perfectly"],
         ["the buttons are hard to press", "the cut-outs do not line up"]),
    ],
    "electric toothbrush": [
        (["my teeth feel really clean", "the timer is very useful"],
         ["it barely cleans anything", "the timer goes off at random"]),
        (["the battery lasts three weeks", "it charges quickly"],
         ["the battery is flat after three days", "it will not hold a charge"]),
        (["it is gentle on my gums", "the brush heads are good value"],
         ["it hurts my gums", "the brush heads cost a fortune"]),
    ],
}  # fmt: skip
REVIEW_OPENERS = [
    "I bought this {product} {when}.", "I have been using this {product} for {duration}.",
    "Got this {product} as a present {when}.", "I needed a new {product} and picked this one.",
]  # fmt: skip
WHEN = ["last month", "two weeks ago", "in the spring", "for my birthday", "after my old one broke"]
DURATIONS = ["a week", "a month", "three months", "half a year", "a couple of weeks"]
# Closing lines by star rating: they agree with the aspects, so both text and verdict carry the rating.
REVIEW_CLOSERS = {
    5: ["Absolutely love it, highly recommended!", "Best purchase I have made this year.", "Five stars, no doubt."],
    4: ["Very happy with it overall.", "Would buy it again despite that.", "Good value, just not perfect."],
    3: ["It is okay for the price.", "Not bad, not great.", "It does the job, nothing more."],
    2: ["I expected a lot more.", "Quite disappointed overall.", "I would not buy it again."],
    1: ["Avoid this one.", "A complete waste of money.", "I am sending it back."],
}
# (praised aspects, criticised aspects) by star rating.
REVIEW_MIX = {5: (2, 0), 4: (2, 1), 3: (1, 1), 2: (1, 2), 1: (0, 2)}
SENTIMENT = {1: "negative", 2: "negative", 3: "neutral", 4: "positive", 5: "positive"}


def _review(rng: random.Random, stars: int) -> dict:
    product = rng.choice(sorted(PRODUCTS))
    good, bad = REVIEW_MIX[stars]
    aspects = rng.sample(PRODUCTS[product], good + bad)
    praise = [rng.choice(a[0]) for a in aspects[:good]]
    complaints = [rng.choice(a[1]) for a in aspects[good:]]
    sentences = [rng.choice(REVIEW_OPENERS).format(product=product, when=rng.choice(WHEN),
                                                   duration=rng.choice(DURATIONS))]  # fmt: skip
    if stars in (4, 2):  # one aspect goes against the verdict: "the only ..."
        main, odd = (praise, complaints) if stars == 4 else (complaints, praise)
        sentences += [f"{rng.choice(['Honestly, ', 'Well, ', ''])}{' and '.join(main)}."]
        lead = "The only downside is that" if stars == 4 else "The only good thing is that"
        sentences.append(f"{lead} {odd[0]}.")
    else:
        parts = praise + complaints
        joiner = " and " if stars != 3 else rng.choice([", but ", ", although "])
        sentences.append(joiner.join(parts) + ".")
    sentences.append(rng.choice(REVIEW_CLOSERS[stars]))
    text = " ".join(s[0].upper() + s[1:] for s in sentences)
    return {"product": product, "text": text, "stars": stars, "label": SENTIMENT[stars]}


def reviews_demo(n: int = 400, seed: int = 0) -> list[dict]:
    """``n`` product reviews ``{"id", "product", "text", "stars", "label"}`` (see module docstring)."""
    return draw_records("reviews", n, seed, lambda rng, i: _review(rng, rotation("reviews", seed, i, [1, 2, 3, 4, 5])),
                        key="text")

