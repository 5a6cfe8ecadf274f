"""Lexicon of the `support-tickets` dataset: customer messages routed to one of six queues.

Each intent is one reason to write in, with several phrasings. Intents marked `new-product` use the
vocabulary of the Nimbus smart-home launch that the `base` training data never contains.
"""

from training.data.lexicon import Intent, Lexicon

_BASE = "base"
_NEW = "new-product"

INTENTS = [
    # billing
    Intent("double_charge", "billing", [
        "I was charged twice for my {plan} subscription this month.",
        "My card shows two payments of {amount} for the same invoice.",
        "Why is there a duplicate charge of {amount} on my statement?",
        "You billed me {amount} two times on {date}, please fix it.",
        "There are two identical charges for order {order} on my bank account.",
    ]),
    Intent("invoice", "billing", [
        "Can I get a VAT invoice for my last payment of {amount}?",
        "The invoice for {date} has the wrong company name on it.",
        "Where do I download invoices for the {plan} plan?",
        "I need a copy of the receipt for order {order} for my accountant.",
        "Please add our tax number to the billing address on future invoices.",
    ]),
    Intent("plan_price", "billing", [
        "Why did the price of the {plan} plan go up to {amount}?",
        "I was promised a discount but paid full price of {amount}.",
        "How do I switch from monthly to annual billing on {plan}?",
        "My promo code {code} was not applied at checkout.",
        "The renewal charged {amount} instead of the price I signed up for.",
    ]),
    Intent("payment_failed", "billing", [
        "My payment keeps getting declined even though the card is valid.",
        "The checkout says payment failed but my bank shows {amount} pending.",
        "How do I update the credit card used for my {plan} subscription?",
        "Autopay did not go through on {date} and now I have a late fee.",
    ]),
    # technical
    Intent("app_crash", "technical", [
        "The {app} crashes every time I open the settings page.",
        "After the latest update the {app} freezes on the loading screen.",
        "I get error {error} when I try to sync my data.",
        "The {app} closes by itself on my {device} as soon as I log in.",
        "The dashboard shows a blank white page and error {error} in the console.",
    ]),
    Intent("connectivity", "technical", [
        "My {gadget} keeps disconnecting from the wifi every few minutes.",
        "The {gadget} won't connect to the network after the firmware update.",
        "Bluetooth pairing fails between my {device} and the {gadget}.",
        "Internet speed drops to almost nothing whenever the {gadget} is on.",
    ]),
    Intent("bug", "technical", [
        "Notifications stopped working on my {device} since {date}.",
        "The export to CSV feature produces an empty file.",
        "Search returns no results even for items I know exist.",
        "The API returns error {error} for every request since this morning.",
        "Videos play without sound in the {app} on my {device}.",
    ]),
    Intent("setup_help", "technical", [
        "How do I install the {gadget} firmware update manually?",
        "What settings do I need to configure the {gadget} with my router?",
        "The setup wizard gets stuck at step three with error {error}.",
        "Is the {app} compatible with my {device}?",
    ]),
    # account
    Intent("password_reset", "account", [
        "I forgot my password and the reset email never arrives.",
        "The password reset link says it has expired.",
        "How do I change my password?",
        "I can't log in, it says my password is incorrect but I just reset it.",
    ]),
    Intent("profile_update", "account", [
        "How do I change the email address on my account?",
        "I want to update my username and profile photo.",
        "Please change the name on my account to {name}.",
        "I moved and need to update my address in my profile.",
    ]),
    Intent("close_account", "account", [
        "Please delete my account and all my data.",
        "How can I close my account permanently?",
        "I want to deactivate my account for a few months.",
        "Can you merge my two accounts into one?",
    ]),
    Intent("account_locked", "account", [
        "My account is locked after too many login attempts.",
        "I can't access my account, it says it is suspended.",
        "Verification code for sign up never arrives on my phone.",
        "How do I add a family member to my account?",
    ]),
    # shipping
    Intent("where_is_order", "shipping", [
        "Where is my order {order}? It has been {days} days.",
        "My package still hasn't arrived and tracking has not updated since {date}.",
        "Tracking for order {order} says delivered but I never received it.",
        "When will order {order} ship? I paid for express delivery.",
        "The {carrier} tracking number for my order doesn't work.",
    ]),
    Intent("delivery_change", "shipping", [
        "Can I change the delivery address for order {order}?",
        "Please hold my package at the {carrier} pickup point.",
        "I need the delivery rescheduled, nobody is home on {date}.",
        "Can you ship order {order} to my office instead?",
    ]),
    Intent("damaged_parcel", "shipping", [
        "The box arrived crushed and the {gadget} inside is dented.",
        "The courier left my parcel in the rain and it is soaked.",
        "Only one of the two items in order {order} was in the package.",
        "My delivery was left at the wrong house.",
    ]),
    Intent("shipping_cost", "shipping", [
        "Why is shipping to my country so expensive?",
        "Do you ship internationally and how long does it take?",
        "I was charged for shipping even though the order was over {amount}.",
    ]),
    # refund
    Intent("refund_request", "refund", [
        "I want a refund for order {order}, the {gadget} doesn't work as advertised.",
        "Please refund the {amount} I paid, I cancelled within the trial.",
        "I returned the {gadget} on {date}, when do I get my money back?",
        "Can I get my money back for the {plan} plan? I never used it.",
        "I'd like to return order {order} for a full refund.",
    ]),
    Intent("refund_status", "refund", [
        "My refund was approved {days} days ago but it's still not on my card.",
        "What is the status of my refund for order {order}?",
        "You promised a refund of {amount} and I still haven't received it.",
        "The refund went to an old card that is closed, what now?",
    ]),
    Intent("return_label", "refund", [
        "How do I get a return label for the {gadget}?",
        "The return portal won't accept order {order}.",
        "Do I have to pay for return shipping on a faulty item?",
        "Can I exchange the {gadget} instead of returning it?",
    ]),
    # security
    Intent("account_hacked", "security", [
        "Someone logged into my account from another country.",
        "I think my account was hacked, my email was changed without me.",
        "There are orders on my account that I did not place.",
        "I got a login alert from a device I don't own.",
    ]),
    Intent("phishing", "security", [
        "I received an email pretending to be from you asking for my card details.",
        "Is this text message with a link to verify my account really from you?",
        "Someone called claiming to be your support and asked for my one-time code.",
        "I clicked a suspicious link in an email that looked like your invoice.",
    ]),
    Intent("two_factor", "security", [
        "How do I turn on two-factor authentication?",
        "I lost my phone and can't get my two-factor codes.",
        "My authenticator app stopped accepting the codes.",
        "Please revoke all active sessions on my account right now.",
    ]),
    Intent("fraud_report", "security", [
        "I want to report a seller who is scamming people.",
        "My card was used fraudulently on your site for {amount}.",
        "Please check for a data breach, my password was leaked.",
    ]),
    # new-product launch: Nimbus smart-home line, vocabulary unseen in `base`
    Intent("nimbus_credits", "billing", [
        "Why were {credits} Nimbus Energy credits deducted from my wallet for a {tier} cycle?",
        "My Nimbus Energy wallet shows {credits} credits owed after the {tier} cycle rolled over.",
        "The kilowatt bundle on my {tier} tier keeps debiting {credits} credits overnight.",
        "Does the Nimbus Energy {tier} tier prorate credits when I downgrade mid-cycle?",
    ], lexicon=_NEW),
    Intent("nimbus_halo", "technical", [
        "The Halo beacon keeps pulsing amber after the Zephyr flash.",
        "My Nimbus hub drops off the mesh whenever the geofence routine fires.",
        "The Lumen ring stays dark and the Halo beacon shows a {pattern} pattern.",
        "Thermostat scenes won't trigger since the Halo joined the Zigbee mesh.",
        "After the Zephyr rollout the Lumen ring reboots in a loop.",
    ], lexicon=_NEW),
    Intent("nimbus_household", "account", [
        "How do I hand over the Nimbus home owner role to my partner?",
        "My household roster in Nimbus still lists my old flatmate as a resident.",
        "Can a guest resident get their own Nimbus keychain without being an owner?",
        "The resident invite for Nimbus home expired before my sister accepted it.",
    ], lexicon=_NEW),
    Intent("nimbus_starter_kit", "shipping", [
        "The Halo starter kit is sitting at the {depot} depot with no ETA.",
        "My Nimbus Lumen bundle went to the locker hub instead of my door.",
        "The pallet freight for the Nimbus solar tile arrives {date}, can it be moved?",
        "Only the Halo beacon came, the Lumen ring is missing from the kit.",
    ], lexicon=_NEW),
    Intent("nimbus_trial", "refund", [
        "The Halo trial bundle goes back within the 30 night window, will I get the deposit?",
        "I sent the Lumen ring back to the {depot} depot, when is my deposit credited?",
        "Nimbus said the solar tile buy-back would be paid, but nothing yet.",
        "Can the Halo kit go back for a trade-in value instead?",
    ], lexicon=_NEW),
    Intent("nimbus_intrusion", "security", [
        "An unknown beacon paired itself to my Nimbus home at 3am.",
        "Someone unlocked my Nimbus smart lock with a keychain I never issued.",
        "My Lumen camera feed was viewed from an unrecognized keychain.",
        "The Halo logged a geofence entry for a resident who was abroad.",
    ], lexicon=_NEW),
]

SLOTS = {
    "plan": ["Pro", "Basic", "Family", "Business", "Premium", "Starter", "Team"],
    "amount": ["$9.99", "$19.99", "$49", "$120", "€35", "£15", "$249.00", "$7.50", "$89"],
    "date": ["Monday", "March 3rd", "last Friday", "the 15th", "yesterday", "June 2", "the weekend"],
    "order": ["#48213", "A-99120", "#10072", "ORD-5531", "#77345", "B-2044", "#3390021"],
    "code": ["SPRING20", "WELCOME10", "FREESHIP", "VIP30", "BLACKFRIDAY"],
    "error": ["E1045", "500", "0x80070005", "403", "ERR_TIMEOUT", "503", "E-22"],
    "app": ["mobile app", "desktop app", "web app", "iOS app", "Android app", "browser extension"],
    "device": ["iPhone 13", "Pixel 7", "Galaxy S22", "MacBook", "Windows laptop", "iPad", "Chromebook"],
    "gadget": ["router", "smart speaker", "camera", "headphones", "tablet", "smartwatch", "printer"],
    "carrier": ["UPS", "FedEx", "DHL", "USPS", "Royal Mail", "DPD"],
    "days": ["5", "10", "12", "three", "two weeks", "20"],
    "name": ["Maria Lopez", "John Smith", "Priya Patel", "Chen Wei", "Anna Kowalski"],
    "credits": ["40", "125", "300", "18", "75"],
    "tier": ["Solstice", "Equinox", "Aurora"],
    "pattern": ["triple blink", "slow breathing", "rapid flicker"],
    "depot": ["Riverside", "Northgate", "Harbor Point", "Kestrel"],
}

OPENERS = [
    "", "", "", "Hi,", "Hello,", "Hi team,", "Hey there,", "Good morning,", "Dear support,",
    "I need help.", "Quick question.", "Not happy right now.", "Hello, I've been a customer for years.",
]

CLOSERS = [
    "", "", "", "Thanks.", "Thank you!", "Please help.", "Please advise.", "Regards.",
    "This is urgent.", "Thanks in advance.", "Can someone get back to me today?", "Cheers.",
]

# How an agent resolved each kind of ticket: the `rewrite` (target text) of support rows, which
# trains the `support-reply` generator and backs the support pipeline's retrieval fallback.
RESOLUTIONS = {
    "double_charge": "Sorry about the duplicate charge. I have refunded the second payment; it "
                     "will show on your statement within 5 business days.",
    "invoice": "You can download every invoice under Billing > Invoices. I have also sent a "
               "corrected copy to your account e-mail.",
    "plan_price": "I have checked your plan: the correct price is now applied and the difference "
                  "will be credited on your next invoice.",
    "payment_failed": "Please update your card under Billing > Payment methods; I have waived the "
                      "late fee and we will retry the payment tomorrow.",
    "app_crash": "Please update the app to the latest version and clear its cache. If it still "
                 "crashes, send us the error code from Settings > About.",
    "connectivity": "Restart the device and the router, then re-add it from the app. Devices "
                    "need a 2.4 GHz network to pair.",
    "bug": "Thanks for the report. Our engineers have reproduced it and a fix ships in the next "
           "release; I will update this ticket when it is out.",
    "setup_help": "Our setup guide walks through each step: Settings > Devices > Add device. I "
                  "can also book a 15-minute call with a technician.",
    "password_reset": "I have sent a password reset link to your account e-mail; it is valid "
                      "for one hour.",
    "profile_update": "Your profile details are updated. Changes to the e-mail address need a "
                      "confirmation click in the message we just sent.",
    "close_account": "Your account is scheduled for closure in 14 days. You can download your "
                     "data until then under Settings > Privacy.",
    "account_locked": "I have unlocked your account after verifying your identity. Please sign "
                      "in and choose a new password.",
    "where_is_order": "Your order is with the carrier and due within 2 business days; the "
                      "tracking link is in your order confirmation.",
    "delivery_change": "I have asked the carrier to change the delivery; you will get a "
                       "confirmation by e-mail once they accept it.",
    "damaged_parcel": "Sorry the parcel arrived damaged. A replacement is on its way and you do "
                      "not need to send the damaged item back.",
    "shipping_cost": "Shipping is free above the threshold shown at checkout; I have refunded "
                     "the shipping fee on this order.",
    "refund_request": "Your refund is approved and goes back to the original payment method "
                      "within 5 to 10 business days.",
    "refund_status": "Your refund was issued; banks usually take 5 to 10 business days to show "
                     "it on your statement.",
    "return_label": "I have e-mailed you a prepaid return label. Drop the parcel at any carrier "
                    "point within 30 days.",
    "account_hacked": "I have signed out every session and locked the account. Reset your "
                      "password with the link we sent and turn on two-factor authentication.",
    "phishing": "That message did not come from us. Please do not click its links; we have "
                "reported the sender.",
    "two_factor": "I have reset two-factor authentication on your account; set it up again "
                  "under Settings > Security after signing in.",
    "fraud_report": "I have blocked the card and opened a fraud case. You will not be charged "
                    "for the transactions you did not make.",
    "nimbus_credits": "Nimbus credits appear within 24 hours of purchase; I have added the "
                      "missing credits to your balance.",
    "nimbus_halo": "Hold the Halo hub's button for 10 seconds to reset it, then pair it again "
                   "from the Nimbus app.",
    "nimbus_household": "I have updated your Nimbus household; invited members get an e-mail "
                        "to accept.",
    "nimbus_starter_kit": "Your Nimbus starter kit has shipped; the tracking link is in your "
                          "order confirmation.",
    "nimbus_trial": "Your Nimbus trial is cancelled and the charge refunded.",
    "nimbus_intrusion": "I have revoked every device session on your Nimbus home and reset the "
                        "hub's access codes. Please change your password.",
}

LEXICON = Lexicon(
    name="support-tickets",
    labels=["billing", "technical", "account", "shipping", "refund", "security"],
    priors={"billing": 0.2, "technical": 0.24, "account": 0.16, "shipping": 0.16,
            "refund": 0.14, "security": 0.1},
    intents=INTENTS,
    slots=SLOTS,
    openers=OPENERS,
    closers=CLOSERS,
    shifted_priors={"billing": 0.05, "technical": 0.1, "account": 0.1, "shipping": 0.1,
                    "refund": 0.3, "security": 0.35},
    replies=RESOLUTIONS,
    # A reorganisation: refunds are now handled by billing, a lost second factor is a security case.
    concept_relabel={"refund_request": "billing", "refund_status": "billing",
                     "password_reset": "security", "account_locked": "security",
                     "damaged_parcel": "refund"},
)
