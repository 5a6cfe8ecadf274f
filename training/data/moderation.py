"""Lexicon of the `moderation` dataset: user posts labelled safe / toxic / spam / pii.

Every toxic phrasing is paired with a safe rewrite that keeps the complaint and drops the abuse:
those pairs train the generative rewriter.
"""

from training.data.lexicon import Intent, Lexicon

_NEW = "new-product"

INTENTS = [
    # safe
    Intent("question", "safe", [
        "Does anyone know when the {feature} update is coming out?",
        "How do I turn on dark mode in the {feature} settings?",
        "Is there a way to export my {thing} to a spreadsheet?",
        "What time does the live event start on {day}?",
        "Can someone recommend a good beginner guide for {topic}?",
    ]),
    Intent("praise", "safe", [
        "Thanks for the quick fix, the {feature} works great now.",
        "Loving the new {feature}, great job team.",
        "The {topic} tutorial yesterday was really helpful.",
        "Shout out to the moderators for keeping this place friendly.",
    ]),
    Intent("chat", "safe", [
        "Just finished my first {topic} project, pretty proud of it.",
        "Anyone else watching the game on {day}?",
        "Good morning everyone, coffee and {topic} today.",
        "I moved my {thing} to the new folder and it all still works.",
    ]),
    Intent("heated_criticism", "safe", [
        "This update is terrible and the devs should be ashamed of the {feature}.",
        "Honestly the {feature} is the worst design decision I have seen this year.",
        "The {feature} is a total disaster, whoever approved it should rethink their job.",
    ]),
    Intent("self_promo", "safe", [
        "I wrote a blog post about {topic}, feedback welcome.",
        "Check out my channel for more {topic} tips.",
        "I made a free template for {thing}, link in my profile.",
    ]),
    # toxic, each with its safe rewrite
    Intent("insult_complaint", "toxic", [
        "{gripe} and you clowns still haven't fixed it. Pathetic.",
        "Are you all idiots? {gripe}!",
        "{gripe}. What a useless bunch of morons.",
        "Only a complete moron would ship this: {gripe}.",
        "{gripe}, you incompetent losers.",
        "Shut up and fix it already, {gripe}, you absolute garbage team.",
    ], rewrites=[
        "{gripe} and it still hasn't been fixed. Could you please look into it?",
        "Could the team please help? {gripe}.",
        "{gripe}. I'm frustrated and would appreciate a fix.",
        "I think this shipped too early: {gripe}.",
        "{gripe}, and I'd like the team to address it.",
        "Please fix this soon: {gripe}.",
    ]),
    Intent("insult_user", "toxic", [
        "Nobody asked for your opinion about {topic}, you pathetic troll.",
        "You're too stupid to understand {topic}, go away.",
        "Get lost, idiot, your take on {topic} is trash.",
        "What a clown, everything you say about {topic} is garbage.",
    ], rewrites=[
        "I disagree with your opinion about {topic}.",
        "I don't think you've understood {topic}; let me explain.",
        "I disagree with your take on {topic}.",
        "I don't agree with what you said about {topic}.",
    ]),
    Intent("threat", "toxic", [
        "Keep posting about {topic} and I will make you regret it.",
        "If {gripe} one more time I'm coming after whoever did it.",
        "You'd better watch your back, {topic} fanboy.",
    ], rewrites=[
        "Please stop posting about {topic} in this thread.",
        "If {gripe} again, I will escalate this to support.",
        "I strongly disagree with fans of {topic}.",
    ]),
    # spam
    Intent("scam_offer", "spam", [
        "Earn {money} a day from home!!! Click {url} now",
        "CONGRATULATIONS you won a free {prize}, claim at {url}",
        "Cheap {product} no prescription, fast delivery {url}",
        "Make {money} weekly with this one trick, DM me",
        "Limited offer: {product} 90% off only today at {url}",
    ]),
    Intent("follow_spam", "spam", [
        "Follow me for follow back!!! {url}",
        "Get 10k followers instantly, visit {url}",
        "Buy likes and views cheap {url} {url}",
    ]),
    # pii
    Intent("contact_details", "pii", [
        "My email is {email}, message me about the {thing}.",
        "Call me at {phone} if you found my {thing}.",
        "Reach me on {phone} or {email} for the meetup.",
        "I live at {address}, send the package there.",
    ]),
    Intent("financial_details", "pii", [
        "Here is my card {card} so you can charge the fee.",
        "Transfer it to my IBAN {iban} please.",
        "My card number is {card}, expiry 09/27, can you check it?",
        "Use IBAN {iban} for the refund of my {thing}.",
    ]),
    # new-product launch: the platform adds Spaces and token drops, bringing unseen vocabulary
    Intent("spaces_chat", "safe", [
        "Hosting a Spaces huddle on {topic} tonight, swing by.",
        "Pinned the {topic} recap in our Spaces lounge.",
        "Who is co-hosting the Spaces stage with me on {day}?",
    ], lexicon=_NEW),
    Intent("token_drop", "spam", [
        "Airdrop live: connect your wallet at {url} to mint free $GLOW tokens",
        "Whitelist spots for the $GLOW presale closing soon, seed phrase check at {url}",
        "Stake {money} of $GLOW and 10x by Friday, verify at {url}",
    ], lexicon=_NEW),
    Intent("spaces_doxx", "pii", [
        "Spaces host lives at {address}, badge number {phone}.",
        "Dropping the moderator's wallet seed and {email} in the lounge.",
    ], lexicon=_NEW),
    Intent("spaces_raid", "toxic", [
        "Raid the {topic} Spaces huddle and ratio every clown in it.",
        "Brigade that Spaces lounge until the host quits, {topic} losers.",
    ], rewrites=[
        "I disagree with the {topic} Spaces huddle and will say so there.",
        "I don't like that Spaces lounge about {topic}.",
    ], lexicon=_NEW),
]

SLOTS = {
    "feature": ["search bar", "dashboard", "photo editor", "chat", "calendar sync", "dark mode",
                "notification center", "playlist view"],
    "thing": ["notes", "photos", "playlists", "bookmarks", "wallet", "keys", "backpack"],
    "topic": ["gardening", "python", "photography", "chess", "baking", "cycling", "knitting",
              "retro games"],
    "day": ["Saturday", "Friday night", "Sunday", "tomorrow", "next week"],
    "gripe": ["the app logs me out every hour", "my messages keep disappearing",
              "the search never finds anything", "the update deleted my saved drafts",
              "the page takes a minute to load", "notifications arrive a day late",
              "my uploads fail every single time"],
    "money": ["$500", "$2,000", "$350", "£1000"],
    "url": ["bit.ly/x7Qz", "cheap-deals.example", "win-now.example/claim", "promo.example/go"],
    "prize": ["iPhone", "gift card", "cruise", "laptop"],
    "product": ["watches", "pills", "sneakers", "followers", "software licenses"],
    "email": ["jane.doe@example.com", "mike77@example.org", "s.kumar@example.net"],
    "phone": ["+1 415 555 0134", "(212) 555-0199", "+44 20 7946 0958", "555-867-5309"],
    "address": ["42 Elm Street, Springfield", "7 Baker Lane, Apt 3", "1600 Ocean Drive"],
    "card": ["4111 1111 1111 1111", "5500 0000 0000 0004", "4012 8888 8888 1881"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB29 NWBK 6016 1331 9268 19"],
}

LEXICON = Lexicon(
    name="moderation",
    labels=["safe", "toxic", "spam", "pii"],
    priors={"safe": 0.55, "toxic": 0.2, "spam": 0.15, "pii": 0.1},
    intents=INTENTS,
    slots=SLOTS,
    openers=["", "", "", "", "lol", "ok so", "Hey all,", "Honestly,"],
    closers=["", "", "", "", "just saying.", "thoughts?", "lol"],
    ambiguity=0.05,
    shifted_priors={"safe": 0.25, "toxic": 0.15, "spam": 0.5, "pii": 0.1},
    # A stricter policy: heated criticism counts as toxic, self-promotion as spam.
    concept_relabel={"heated_criticism": "toxic", "self_promo": "spam"},
)
