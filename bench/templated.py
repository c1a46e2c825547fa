"""A templated batch workload: one instruction, many records, the kind of job whose outputs share long spans.

`extraction_prompts(n)` writes n prompts that ask for the same JSON fields of a different made-up record each
(name, age, city, occupation, in one of several phrasings), deterministic for a seed. No record is in any
training data: they are drawn here. The outputs of such a job share their structure (keys, punctuation,
formatting) and copy values from their own prompt, which is what cross-request drafts exploit.
"""

from __future__ import annotations

import random

INSTRUCTION = (
    "Extract the person's name, age, city and occupation from the text below. Answer with a JSON object with "
    'the keys "name", "age", "city" and "occupation", and nothing else.'
)
FIRST_NAMES = (
    "Alice Bruno Chloe Dmitri Elena Farid Greta Hiro Ivana Jonas Kofi Lena Mateo Nadia Oscar Priya Quentin Rosa "
    "Samir Tara Ulrich Vera Wen Ximena Yusuf Zoe Amara Bashir Carmen Diego"
).split()
LAST_NAMES = (
    "Okafor Lindqvist Moreau Tanaka Rossi Haddad Novak Silva Kowalski Fischer Mensah Ortega Petrov Shah Dubois "
    "Nakamura Costa Jensen Alvarez Kim"
).split()
CITIES = (
    "Lisbon,Nairobi,Osaka,Toronto,Krakow,Lyon,Austin,Porto,Seoul,Munich,Accra,Valencia,Denver,Gothenburg,Cusco,"
    "Hanoi,Glasgow,Perth,Quito,Tbilisi"
).split(",")
OCCUPATIONS = (
    "nurse,software engineer,baker,architect,teacher,electrician,journalist,pharmacist,carpenter,pilot,"
    "accountant,photographer,chef,librarian,veterinarian,plumber,translator,dentist,firefighter,geologist"
).split(",")
PHRASINGS = (
    "{name} is a {age}-year-old {occupation} who lives in {city}.",
    "Meet {name}, {age}, a {occupation} based in {city}.",
    "{name} ({age}) works as a {occupation} in {city}.",
    "Born {age} years ago, {name} now lives in {city} and works as a {occupation}.",
    "Our new neighbour in {city} is {name}; the {occupation} turned {age} last month.",
)


def extraction_prompts(n: int, seed: int = 0) -> list[str]:
    """n extraction prompts over distinct made-up records."""
    generator = random.Random(seed)
    prompts, seen = [], set()
    while len(prompts) < n:
        record = {
            "name": f"{generator.choice(FIRST_NAMES)} {generator.choice(LAST_NAMES)}",
            "age": generator.randint(19, 78),
            "city": generator.choice(CITIES),
            "occupation": generator.choice(OCCUPATIONS),
        }
        text = generator.choice(PHRASINGS).format(**record)
        if text in seen:
            continue
        seen.add(text)
        prompts.append(f"{INSTRUCTION}\n\nText: {text}")
    return prompts
