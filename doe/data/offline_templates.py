"""The templates and word lists of DoE's offline task suite, and one text generator per task
(``make_offline.py`` assembles the files from them). Each generator takes a seeded
``random.Random`` and a label name and returns one text."""

from __future__ import annotations

import random
import re

def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def norm(text: str) -> str:
    """The key duplicates are judged by: lower case, letters/digits/spaces only."""
    return " ".join(re.sub(r"[^0-9a-z ]+", " ", text.lower()).split())


# ---------------------------------------------------------------------------------------------
# offline_sentiment
# ---------------------------------------------------------------------------------------------

_SENT_DOMAINS = {
    "film": {
        "subjects": ["the film", "this movie", "the sequel", "the documentary", "the new thriller",
                     "this animated feature", "the remake", "the director's latest film", "this comedy",
                     "the war drama"],
        "aspects": ["the acting", "the plot", "the soundtrack", "the pacing", "the ending", "the dialogue",
                    "the camera work", "the lead performance", "the script", "the special effects"],
        "context": ["We watched it on a rainy Sunday.", "I saw it at the late showing.",
                    "My brother picked it for movie night.", "It runs a little over two hours.",
                    "I went in knowing nothing about it.", "The cinema was half empty."],
        "pos_verdict": ["I would watch it again tomorrow.", "Go and see it on the big screen.",
                        "It stayed with me for days.", "The whole audience applauded at the end.",
                        "Easily one of the best films of the year."],
        "neg_verdict": ["I checked my watch every ten minutes.", "Half the audience left early.",
                        "I want those two hours back.", "Skip it, even if it is free to stream.",
                        "I nearly fell asleep in the second half."],
    },
    "book": {
        "subjects": ["the novel", "this book", "the memoir", "the cookbook", "the author's second book",
                     "this collection of short stories", "the biography", "the mystery novel"],
        "aspects": ["the writing", "the main character", "the plot", "the final chapter", "the translation",
                    "the recipes", "the prose", "the twist"],
        "context": ["I read it on a long train journey.", "A friend lent it to me.",
                    "I picked it up at the airport.", "It was our book club choice this month.",
                    "I finished it over a weekend."],
        "pos_verdict": ["I could not put it down.", "I have already bought copies for two friends.",
                        "I will read everything this author writes.", "It deserves every prize it gets."],
        "neg_verdict": ["I gave up halfway through.", "I donated it the next day.",
                        "I forced myself to finish it.", "I will not read the sequel."],
    },
    "product": {
        "subjects": ["these headphones", "the blender", "this backpack", "the phone case", "my new laptop",
                     "the coffee maker", "this vacuum cleaner", "the running shoes", "the electric kettle",
                     "this desk lamp", "the air fryer", "the wireless keyboard"],
        "aspects": ["the battery", "the build quality", "the price", "the design", "the instructions",
                    "customer support", "the sound", "the materials", "the packaging", "the delivery"],
        "context": ["I bought it last month.", "It arrived on a Tuesday.", "My sister recommended it.",
                    "I ordered it during the spring sale.", "I have used it every day for three weeks.",
                    "It replaced one I had for ten years."],
        "pos_verdict": ["I would happily buy it again.", "Five stars from me.", "Worth every penny.",
                        "My whole family uses it now.", "I already ordered a second one as a gift."],
        "neg_verdict": ["I returned it after a week.", "I want my money back.", "One star, and that is generous.",
                        "Save yourself the trouble and buy something else.", "It went straight back in the box."],
    },
    "restaurant": {
        "subjects": ["the restaurant", "this cafe", "the new pizza place", "the sushi bar",
                     "the bistro on the corner", "this bakery", "the steakhouse", "the noodle shop"],
        "aspects": ["the staff", "the food", "the service", "the desserts", "the portions", "the coffee",
                    "the wine list", "the waiting time"],
        "context": ["We went on a Saturday evening.", "We booked a table for six.", "I stopped by for lunch.",
                    "It was our anniversary dinner.", "We found it by chance on holiday."],
        "pos_verdict": ["We will be back soon.", "Book a table before everyone finds out about it.",
                        "I am telling all my friends about it.", "We are already planning our next visit."],
        "neg_verdict": ["We will not be going back.", "We left hungry and annoyed.",
                        "I have complained to the manager.", "There are better places on the same street."],
    },
    "hotel": {
        "subjects": ["the hotel", "this guesthouse", "the resort", "the hostel", "the holiday apartment",
                     "the airport hotel"],
        "aspects": ["the room", "the breakfast", "the location", "the reception staff", "the bed",
                    "the pool", "the wifi", "the view"],
        "context": ["We stayed three nights in August.", "I was there for a work trip.",
                    "We arrived late after a delayed flight.", "It was our first trip abroad with the kids."],
        "pos_verdict": ["We would stay here again in a heartbeat.", "It made the whole trip.",
                        "Already booked for next summer."],
        "neg_verdict": ["We checked out a day early.", "Never again.", "I would rather sleep in the car.",
                        "The photos online are very misleading."],
    },
    "app": {
        "subjects": ["the app", "this game", "the new update", "the budgeting app", "the language app",
                     "this photo editor"],
        "aspects": ["the interface", "the latest update", "the free version", "the notifications",
                    "the sync feature", "the tutorial", "the subscription"],
        "context": ["I installed it on my phone and tablet.", "I have been using it since January.",
                    "A colleague showed it to me.", "I tried it after reading the reviews."],
        "pos_verdict": ["I use it every single day.", "Easily worth the subscription.",
                        "It has replaced three other apps for me."],
        "neg_verdict": ["Uninstalled after two days.", "I cancelled the subscription.",
                        "I went back to the old app."],
    },
}

_POS_ADJ = ["excellent", "wonderful", "superb", "delightful", "really well made", "charming", "impressive",
            "reliable", "outstanding", "a joy", "beautifully done", "solid", "fantastic", "a real treat",
            "far better than I expected", "genuinely great", "lovely", "top notch", "brilliant"]
_NEG_ADJ = ["awful", "disappointing", "a waste of money", "poorly made", "boring", "flimsy", "dreadful",
            "frustrating", "mediocre at best", "unreliable", "terrible", "a letdown", "clumsy", "overpriced",
            "tedious", "a mess", "far worse than I expected", "painfully dull", "a real chore"]
# negated phrases: the polarity is the opposite of the word they contain
_POS_NEG = ["not bad at all", "not disappointing in the slightest", "never boring", "nothing like the bad reviews said",
            "not the flimsy thing I feared", "hardly a waste of money", "not overpriced for what you get"]
_NEG_NEG = ["not good", "not worth it", "nothing special", "hardly impressive", "not as great as the reviews claimed",
            "not something I would recommend", "never once enjoyable", "not even close to excellent"]
_POS_GENERIC = ["I can't find anything to complain about.", "I have no regrets at all.", "Highly recommended.",
                "Honestly, it exceeded every expectation.", "I was pleasantly surprised.",
                "It is not perfect, but it is close."]
_NEG_GENERIC = ["I would not recommend it to anyone.", "I can't say I enjoyed it.", "What a disappointment.",
                "I really wanted to like it.", "It is not terrible, but it is not good either.",
                "I regret it."]
# neutral-context sentences that carry a word of the *other* polarity
_POS_DISTRACT = ["Despite the bad weather, we had a great time.", "I was worried after some awful reviews.",
                 "My friend hated it, but I did not.", "I expected a boring evening."]
_NEG_DISTRACT = ["Even on a perfect sunny day, nothing could save it.", "The reviews were excellent, which is why I tried it.",
                 "The poster promised a wonderful experience.", "I really wanted to love it."]


def sentiment_text(rng: random.Random, label: str) -> str:
    d = _SENT_DOMAINS[_pick(rng, sorted(_SENT_DOMAINS))]
    pos = label == "positive"
    subj, aspect = _pick(rng, d["subjects"]), _pick(rng, d["aspects"])
    aspect2 = _pick(rng, [a for a in d["aspects"] if a != aspect])
    same = _pick(rng, _POS_ADJ if pos else _NEG_ADJ)
    same2 = _pick(rng, _POS_ADJ if pos else _NEG_ADJ)
    other = _pick(rng, _NEG_ADJ if pos else _POS_ADJ)
    negated = _pick(rng, _POS_NEG if pos else _NEG_NEG)
    cores = [
        f"{_cap(subj)} was {same}.",
        f"{_cap(subj)} is {negated}.",
        f"{_cap(aspect)} is {same}, and {aspect2} is {same2}.",
        f"Although {aspect} was {other}, overall {subj} was {same}.",
        f"{_cap(aspect)} was {other}, but everything else about {subj} was {same}.",
        f"Honestly, {subj} was {negated}.",
        f"I have to say {aspect} was {same}.",
        (f"I expected little, but {subj} turned out to be {same}." if pos
         else f"I had high hopes, but {subj} turned out to be {same}."),
        f"Some say {aspect} is {other}; I found {subj} {same}.",
        f"{_cap(aspect)}? {_cap(same)}. {_cap(aspect2)}? {_cap(same2)}.",
    ]
    parts = []
    if rng.random() < 0.45:
        parts.append(_pick(rng, d["context"]))
    if rng.random() < 0.2:
        parts.append(_pick(rng, _POS_DISTRACT if pos else _NEG_DISTRACT))
    parts.append(_pick(rng, cores))
    r = rng.random()
    if r < 0.4:
        parts.append(_pick(rng, d["pos_verdict"] if pos else d["neg_verdict"]))
    elif r < 0.65:
        parts.append(_pick(rng, _POS_GENERIC if pos else _NEG_GENERIC))
    elif r < 0.8:
        aspect3 = _pick(rng, [a for a in d["aspects"] if a not in (aspect, aspect2)])
        negated2 = _pick(rng, [n for n in (_POS_NEG if pos else _NEG_NEG) if n != negated])
        parts.append(_cap(f"{aspect3} was {negated2}."))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# offline_topic
# ---------------------------------------------------------------------------------------------

_TOPICS = {
    "sports": {
        "actors": ["the Riverside Rovers", "the national rugby team", "a veteran goalkeeper", "the 19-year-old sprinter",
                   "the defending tennis champion", "the league leaders", "the visiting team", "the marathon runner",
                   "the head coach", "the cricket captain", "the cycling team", "the young striker"],
        "events": ["won the cup final", "scored twice in the second half", "was sent off in the opening minutes",
                   "broke the course record", "signed a three-year contract", "announced a retirement after fifteen seasons",
                   "reached the semi-finals", "lost on penalties", "set a personal best in the 400 metres",
                   "climbed to second in the table", "beat the favourites in straight sets", "signed a record transfer deal"],
        "contexts": ["in front of a sold-out stadium", "at the world championships", "during Sunday's derby",
                     "after a late equaliser", "despite a hamstring injury", "on the final day of the season",
                     "in the Olympic qualifiers"],
        "followups": ["Fans celebrated late into the night.", "The rematch is scheduled for next month.",
                      "The manager praised the defence.", "Tickets for the final sold out in an hour.",
                      "It was the club's first trophy in a decade.", "The referee's decision is still being debated."],
    },
    "technology": {
        "actors": ["the chipmaker", "a Berlin start-up", "the smartphone maker", "open-source developers",
                   "the software company", "engineers at the search giant", "a group of security researchers",
                   "the cloud provider", "the games studio", "the social network"],
        "events": ["released an operating system update", "patched a critical security flaw", "unveiled a foldable phone",
                   "launched a faster graphics processor", "rolled out end-to-end encrypted messaging",
                   "shipped a new version of its web browser", "open-sourced its compiler",
                   "made its language model available to developers", "fixed a bug that drained laptop batteries",
                   "launched a team collaboration app", "cut the price of its cloud storage plans",
                   "released a record number of software patches"],
        "contexts": ["at its annual developer conference", "after users reported crashes", "ahead of the holiday season",
                     "for millions of Android users", "following a data breach", "in a blog post on Tuesday",
                     "for both desktop and mobile"],
        "followups": ["The update is rolling out to users this week.", "Developers can download the beta today.",
                      "Reviewers praised the battery life.", "The source code is available online.",
                      "Users are advised to install the patch immediately.", "The app crashed for some users at launch."],
    },
    "business": {
        "actors": ["the retailer", "shareholders", "the central bank", "the airline", "the car manufacturer",
                   "investors", "the supermarket chain", "the oil company", "the bank's chief executive",
                   "the insurance group", "the fashion brand"],
        "events": ["reported a 12 percent rise in quarterly profit", "agreed to buy a rival for two billion dollars",
                   "cut its full-year sales forecast", "raised interest rates by a quarter point",
                   "announced 3,000 job cuts", "saw its shares fall sharply", "signed a long-term supply deal",
                   "filed for bankruptcy protection", "paid a record dividend", "hired a new management team",
                   "launched a takeover bid", "posted its first annual loss in twenty years"],
        "contexts": ["after weak holiday sales", "as inflation eased", "amid a slowdown in consumer spending",
                     "on the stock exchange", "ahead of its annual meeting", "despite rising fuel costs",
                     "according to its quarterly report"],
        "followups": ["Analysts expect the shares to recover next quarter.", "The deal still needs regulatory approval.",
                      "Markets closed slightly higher.", "Unions have called for talks.",
                      "The company will publish full results in March.", "Its stock is down 8 percent this year."],
    },
    "science": {
        "actors": ["astronomers", "a team of biologists", "researchers at the university hospital",
                   "climate scientists", "doctors", "the space agency", "geologists", "a large new study",
                   "physicists", "marine biologists", "neuroscientists"],
        "events": ["discovered a planet orbiting a nearby star", "found that regular exercise lowers blood pressure",
                   "sequenced the genome of a rare frog", "measured record ocean temperatures",
                   "tested a vaccine against malaria", "launched a probe toward Jupiter",
                   "identified a gene linked to memory loss", "observed a rare particle decay",
                   "mapped every neuron in a fruit fly brain", "found microplastics in deep-sea fish",
                   "linked poor sleep to heart disease", "dated the oldest known cave paintings"],
        "contexts": ["in a paper published on Monday", "after a decade of observations", "in a trial with 4,000 patients",
                     "using data from a space telescope", "in the journal's latest issue", "during an Antarctic expedition",
                     "with a new kind of microscope"],
        "followups": ["The findings could change how the disease is treated.", "The results still need to be replicated.",
                      "The team plans a larger trial next year.", "The probe will take six years to arrive.",
                      "Other researchers called the result remarkable.", "The samples are now being analysed."],
    },
}
_TOPIC_LEADS = ["Reports say", "According to officials,", "Breaking:", "Earlier today", "On Friday,", "Late last night"]


def topic_text(rng: random.Random, label: str) -> str:
    t = _TOPICS[label]
    actor, event = _pick(rng, t["actors"]), _pick(rng, t["events"])
    context, followup = _pick(rng, t["contexts"]), _pick(rng, t["followups"])
    r = rng.randrange(6)
    if r == 0:
        s = f"{_cap(actor)} {event} {context}."
    elif r == 1:
        s = f"{_cap(context)}, {actor} {event}."
    elif r == 2:
        s = f"{_pick(rng, _TOPIC_LEADS)} {actor} {event}."
    elif r == 3:
        s = f"{_cap(actor)} {event}. {followup}"
    elif r == 4:
        s = f"{_cap(actor)} {event} {context}. {followup}"
    else:
        s = f"{_cap(actor)} {event}"      # headline style, no full stop
    return s


# ---------------------------------------------------------------------------------------------
# offline_question
# ---------------------------------------------------------------------------------------------

# (noun phrase, pronoun for tag questions)
_Q_SUBJECTS = [("you", "you"), ("they", "they"), ("we", "we"), ("your brother", "he"), ("the neighbours", "they"),
               ("she", "she"), ("the manager", "she"), ("Anna", "she"), ("the kids", "they"), ("Tom", "he"),
               ("your parents", "they"), ("I", "I"), ("he", "he")]
# (base form, past form)
_Q_VPS = [("park the car", "parked the car"), ("lock the front door", "locked the front door"),
          ("book the tickets", "booked the tickets"), ("call the plumber", "called the plumber"),
          ("finish the report", "finished the report"), ("leave the window open", "left the window open"),
          ("move to Lisbon", "moved to Lisbon"), ("sell the old bike", "sold the old bike"),
          ("feed the cat", "fed the cat"), ("cancel the meeting", "cancelled the meeting"),
          ("pay the electricity bill", "paid the electricity bill"), ("fix the heating", "fixed the heating"),
          ("take the early train", "took the early train"), ("water the plants", "watered the plants"),
          ("read the contract", "read the contract"), ("bring an umbrella", "brought an umbrella"),
          ("change the password", "changed the password"), ("order the pizza", "ordered the pizza"),
          ("meet the new teacher", "met the new teacher"), ("send the invitations", "sent the invitations")]
_Q_OBJECT = {"I": "me", "he": "him", "she": "her", "they": "them", "we": "us"}
_Q_PAST_TIMES = ["", "", "", " yesterday", " last night", " this morning", " after lunch", " on Monday"]
_Q_FUTURE_TIMES = ["", "", " tomorrow", " next week", " before Friday", " tonight"]
_Q_WH = ["where", "when", "why", "how", "at what time", "how often"]
_Q_WH_SHORT = ["where", "when", "why", "how"]
_Q_MODALS = ["can", "could", "should", "would", "must"]


def question_text(rng: random.Random, label: str) -> str:
    (s, pron), (base, past) = _pick(rng, _Q_SUBJECTS), _pick(rng, _Q_VPS)
    tp, tf = _pick(rng, _Q_PAST_TIMES), _pick(rng, _Q_FUTURE_TIMES)
    wh, whs = _pick(rng, _Q_WH), _pick(rng, _Q_WH_SHORT)
    modal = _pick(rng, _Q_MODALS)
    obj = _Q_OBJECT.get(s, s)
    if label == "question":
        so = f"so {s} {past}{tp}"  # a statement said as a question: only the "?" tells
        core = _pick(rng, [
            f"did {s} {base}{tp}",
            f"{wh} did {s} {base}{tp}",
            f"will {s} {base}{tf}",
            f"{modal} {s} {base}{tf}",
            f"why didn't {s} {base}{tp}",
            f"{s} {past}{tp}, didn't {pron}",
            f"do you know {wh} {s} {past}{tp}",
            f"do you think {s} will {base}{tf}",
            f"is it true that {s} {past}{tp}",
            so,
            f"any idea {wh} {s} {past}{tp}",
            f"{wh} will {s} {base}{tf}",
            f"who told {obj} to {base}",
        ])
        p = rng.random()
        end = "?" if core is so or p < 0.6 else ("" if p < 0.85 else ".")
    else:
        core = _pick(rng, [
            f"{s} {past}{tp}",
            f"{s} will {base}{tf}",
            f"{s} didn't {base}{tp}",
            f"{s} {modal} {base}{tf}",
            f"I wonder {wh} {s} {past}{tp}",
            f"nobody knows {wh} {s} {past}{tp}",
            f"she asked me {wh} {s} {past}{tp}",
            f"I'm not sure whether {s} {past}{tp}",
            f"that's {whs} {s} {past}{tp}",
            f"it's true that {s} {past}{tp}",
            f"only after lunch did {s} {base}",     # inversion, but a statement
            f"he asked \"did {s} {base}?\" and nobody answered",
            f"I can't remember {wh} {s} {past}{tp}",
            f"whoever told {obj} to {base} was right",
        ])
        p = rng.random()
        end = "." if p < 0.65 else ("" if p < 0.9 else "!")
    core = core.replace("  ", " ")
    return _cap(core) + end


# ---------------------------------------------------------------------------------------------
# offline_spam
# ---------------------------------------------------------------------------------------------

_SPAM_PRIZES = ["a $500 gift card", "a brand new phone", "a luxury cruise for two", "a cash prize of 1,000 pounds",
                "a free tablet", "two return flights", "a shopping voucher worth 250 euros", "a new games console"]
_SPAM_PRODUCTS = ["designer watches", "weight loss pills", "premium sunglasses", "all our mattresses",
                  "top brand perfumes", "car insurance", "online courses", "vitamin bundles"]
_SPAM_ACCOUNTS = ["bank account", "email account", "parcel delivery", "mobile contract", "streaming subscription",
                  "tax refund", "credit card"]
_SPAM_DOMAINS = ["secure-verify", "prize-claim", "best-deals", "account-update", "win-now", "fast-cash",
                 "parcel-track", "offer-zone"]
_SPAM_TLDS = ["biz", "info", "top", "xyz", "club", "net"]
_HAM_NAMES = ["Sam", "mum", "Priya", "Dad", "Leo", "Jess", "Omar", "Kate", "Grandma", "Ben"]
_HAM_ITEMS = ["milk", "my charger", "the spare keys", "some bread", "my blue scarf", "the parcel", "the tickets",
              "my glasses", "a birthday card", "the dog's lead"]
_HAM_EVENTS = ["dinner", "the cinema", "football practice", "the dentist", "book club", "the school play",
               "coffee", "the gym", "the quiz night", "lunch"]
_HAM_TIMES = ["tonight", "tomorrow", "at 7", "on Saturday", "after work", "this afternoon", "at half past six",
              "next Friday"]
_SPAM_URGENCY = ["", "", "URGENT: ", "FINAL NOTICE: ", "Dear customer, ", "Congratulations! ", "ACT NOW: "]


def _url(rng: random.Random) -> str:
    return f"http://{_pick(rng, _SPAM_DOMAINS)}.{_pick(rng, _SPAM_TLDS)}/{rng.randrange(10_000, 99_999)}"


def spam_text(rng: random.Random, label: str) -> str:
    phone = f"0{rng.randrange(800, 900)} {rng.randrange(100, 1000)} {rng.randrange(1000, 10000)}"
    short = str(rng.randrange(60000, 89999))
    money = _pick(rng, ["$1,000", "500 pounds", "2,000 euros", "$750", "$5,000", "900 pounds"])
    name, item, event, when = (_pick(rng, _HAM_NAMES), _pick(rng, _HAM_ITEMS), _pick(rng, _HAM_EVENTS),
                               _pick(rng, _HAM_TIMES))
    if label == "spam":
        r = rng.randrange(12)
        msgs = [
            f"You have been selected to receive {_pick(rng, _SPAM_PRIZES)}. Call {phone} now to claim.",
            f"Your {_pick(rng, _SPAM_ACCOUNTS)} has been suspended. Verify your details at {_url(rng)} within 24 hours.",
            f"Earn {money} a week working from home, no experience needed. Reply YES to start today.",
            f"Limited offer: {rng.choice([40, 50, 60, 70, 80])}% off {_pick(rng, _SPAM_PRODUCTS)}. Click {_url(rng)} before midnight.",
            f"You have won {money} in our weekly draw! Text CLAIM to {short} to collect your prize.",
            f"Your parcel could not be delivered. Pay the 1.99 redelivery fee at {_url(rng)}",
            f"Your {_pick(rng, _SPAM_ACCOUNTS)} needs attention. Log in here to avoid interruption: {_url(rng)}",
            f"Hi, I am a recruiter and we have a job for you paying {money} per week. Message me on {phone}.",
            f"We tried to reach you about your recent accident claim. You may be owed {money}. Call {phone}.",
            f"Free entry to win {_pick(rng, _SPAM_PRIZES)}! Reply WIN to {short}. Std rates apply.",
            f"Your loan of {money} is pre-approved. No credit checks. Apply at {_url(rng)}",
            f"Get {_pick(rng, _SPAM_PRODUCTS)} at wholesale prices, only while stocks last. Order on {phone}",
        ]
        prefix, body = _pick(rng, _SPAM_URGENCY), msgs[r]
        if prefix.endswith(", "):
            body = body[:1].lower() + body[1:]
        text = prefix + body
        if rng.random() < 0.25:
            text += _pick(rng, [" To opt out reply STOP.", " Offer ends today.", " Don't miss out!",
                                " This is your last chance."])
        return text
    msgs = [
        f"Hey, are we still on for {event} {when}?",
        f"Can you pick up {item} on your way home",
        f"Running about {rng.choice([5, 10, 15, 20])} minutes late, sorry! Start without me.",
        f"{_cap(name)} says {event} is {when}.",
        f"Thanks for {event} yesterday, it was lovely to see you.",
        f"Don't forget {item} before you leave.",
        f"The meeting moved to {when}, room {rng.randrange(1, 40)}.",
        f"Happy birthday {name}! Hope you have a great day.",
        f"I left {item} at your place, can I grab it {when}?",
        f"Are you free {when}? Fancy {event}?",
        f"Call me when you land, {name} is picking us up.",
        f"We won the quiz last night! {_cap(name)} knew every answer about rivers.",
        f"Urgent: I locked myself out, do you still have {item}?",
        f"{_cap(name)} offered to drive us to {event} {when}.",
        f"The bakery has a free coffee offer on Mondays, want to go {when}?",
        f"Here's the link to the photos from {event}: photos.{name.lower()}family.net/{rng.randrange(100, 999)}",
        f"Did you win anything at the raffle? {_cap(name)} got a prize for the best cake.",
        f"Got your message. I'll call you back {when}.",
    ]
    return _pick(rng, msgs)
