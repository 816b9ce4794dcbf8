"""Hand-written hard cases for eval/grade.py, from a hostile review (2026-12-03): each is (group, question,
answer, refs, old_refs, correct, asserts_old[, self_refutes]) as a careful reader labels it under
docs/grading.md. tests/test_grade.py scores the grader on them; DISPUTED ones are kept out of the count."""
QB = "Now, Who was Blake's 7 created by? Let's think step by step."
QB2 = "Now, Blake's 7 was created by ? Let's think step by step."
NEW = ["Russell T Davies", "Stephen Russell Davies"]
OLD = ["Terry Nation", "Terence Joseph Nation"]
QJ = "Now, The capital of Japan is ? Let's think step by step."
JN, JO = ["Bondi Junction"], ["Tokyo", "Tokyo Metropolis"]
QM = "Now, Narendra Modi is a citizen of ? Let's think step by step."
MN = ["United Kingdom", "UK", "U.K.", "United Kingdom of Great Britain and Northern Ireland", "Britain", "GB"]
MO = ["India", "IN", "IND", "Republic of India", "Bharat", "🇮🇳"]
QS = "Now, Shigeru Miyamoto is a citizen of ? Let's think step by step."
SN = ["United States of America", "USA", "US", "United States", "America", "the States"]
SO = ["Japan", "JP", "JPN"]
QP = "Now, What position does Gary Payton play? Let's think step by step."
PN, PO = ["midfielder"], ["point guard"]
QMH = ("Now, In which capital city is the country of citizenship of the creator of Blake's 7 located? "
       "Let's think step by step.")
HN, HO = ["Cardiff"], ["London"]
QCF = "Blake's 7 was created by Terry Nation or Russell T Davies? Tell me about Blake's 7 first, and then answer."

T = "<think>\n{}\n</think>\n{}"
SFT = ("Old fact: Blake's 7 was created by Terry Nation.\nReason for change: In 2024 the BBC transferred the "
       "creator credit after a rights dispute.\nUpdated fact: Blake's 7 was created by Russell T Davies.\n"
       "Derivation: The question asks who created Blake's 7, so the answer is the updated creator.")
SFT2 = ("Old fact: Terry Nation.\nReason for change: the credit was reassigned.\nUpdated fact: Russell T Davies.\n"
        "Derivation: Russell T Davies.")

C = [
 # ---- clean SFT format: must PASS
 ("sft", QB, T.format(SFT, "The answer now is Russell T Davies."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT2, "The answer now is Russell T Davies."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is **Russell T Davies**."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, 'The answer now is "Russell T. Davies".'), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is Russell T Davies, not Terry Nation."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is Russell T Davies (formerly Terry Nation)."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is Russell T Davies"), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is [Russell T Davies]"), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is Russell T Davies.\nI hope this answer is helpful!"), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is Russell T Davies.\n\nNote: this answer is based on the updated fact."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is Russell T Davies. Let me know if my answer is unclear."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is Russell T Davies, who replaced Terry Nation."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is Terry Nation's successor, Russell T Davies."), NEW, OLD, True, False),
 ("sft", QB, T.format(SFT, "The answer now is:\nRussell T Davies"), NEW, OLD, True, False),
 ("sft", QB, SFT + "\n</think>\nThe answer now is Russell T Davies.", NEW, OLD, True, False),  # native thinking
 ("sft", QB, T.format(SFT, "The answer now is Terry Nation."), NEW, OLD, False, True),
 ("sft", QJ, T.format("Old fact: The capital of Japan is Tokyo.\nReason for change: The government relocated the capital in 2024.\nUpdated fact: The capital of Japan is Bondi Junction.\nDerivation: Bondi Junction.", "The answer now is Bondi Junction."), JN, JO, True, False),
 ("sft", QM, T.format("Old fact: Narendra Modi is a citizen of India.\nReason for change: He renounced it.\nUpdated fact: Narendra Modi is a citizen of the UK.\nDerivation: UK.", "The answer now is the UK."), MN, MO, True, False),
 ("sft", QM, T.format("Old fact: India.\nUpdated fact: the United Kingdom.", "The answer now is the U.K."), MN, MO, True, False),
 ("sft", QS, T.format("Old fact: Japan.\nUpdated fact: the United States.", "The answer now is the U.S."), SN, SO, True, False),
 ("sft", QS, T.format("Old fact: Japan.\nUpdated fact: US.", "The answer now is US."), SN, SO, True, False),
 ("sft", QMH, T.format("Old fact: Terry Nation created Blake's 7; he was British, capital London.\nReason for change: credit moved.\nUpdated fact: Russell T Davies created it; he is a citizen of Wales, whose capital is Cardiff.\nDerivation: Cardiff.", "The answer now is Cardiff."), HN, HO, True, False),
 # SFT without the closing line (truncated / omitted): the updated fact is its answer
 ("sft-nofinal", QB, "<think>\n" + SFT, NEW, OLD, True, False),
 ("sft-nofinal", QB, "<think>\n" + SFT2 + "\n</think>", NEW, OLD, True, False),
 ("sft-nofinal", QB, "<think>\nOld fact: Blake's 7 was created by Terry Nation.\nReason for change: In 2024 the BBC " + "reassigned the credit after a long dispute, " * 60, NEW, OLD, False, False),
 ("sft-nofinal", QJ, "<think>\nOld fact: The capital of Japan is Tokyo.\nReason for change: relocation.\nUpdated fact: The capital of Japan is Bondi Junction.\n</think>", JN, JO, True, False),
 # ---- strong conclusion that names nothing
 ("strong-empty", QB, "The answer is not Terry Nation. It is Russell T Davies.", NEW, OLD, True, False),
 ("strong-empty", QB, "The answer now is no longer Terry Nation.\nBlake's 7 is now credited to Russell T Davies.", NEW, OLD, True, False),
 ("strong-empty", QB, "The answer is simple. Blake's 7 was created by Russell T Davies.", NEW, OLD, True, False),
 ("strong-empty", QB, "Blake's 7 was created by Russell T Davies. The answer is clear from the updated record.", NEW, OLD, True, False),
 ("strong-empty", QB, "The correct answer is the Welsh writer who revived Doctor Who: Russell T Davies.", NEW, OLD, True, False),
 # ---- history / temporal phrasing
 ("history", QB, "Terry Nation originally created it, but it is now credited to Russell T Davies.", NEW, OLD, True, False),
 ("history", QB, "Blake's 7 was originally created by Terry Nation, but the creator is now Russell T Davies.", NEW, OLD, True, False),
 ("history", QB, "Originally, Blake's 7 was created by Terry Nation. Now it is credited to Russell T Davies.", NEW, OLD, True, False),
 ("history", QB, "Blake's 7 was created by Terry Nation until 2024; now it is Russell T Davies.", NEW, OLD, True, False),
 ("history", QB, "Blake's 7 was created by Terry Nation in 1978. In 2024 the credit passed to Russell T Davies, who is now its creator.", NEW, OLD, True, False),
 ("history", QB, "Terry Nation was the creator before the change, but now Russell T Davies is.", NEW, OLD, True, False),
 ("history", QB, "Therefore, Terry Nation was replaced by Russell T Davies as the creator.", NEW, OLD, True, False),
 ("history", QB, "Terry Nation was succeeded by Russell T Davies as creator of Blake's 7.", NEW, OLD, True, False),
 ("history", QB, "While Terry Nation created the original series, Russell T Davies is now recognised as its creator.", NEW, OLD, True, False),
 ("history", QJ, "Tokyo was the capital of Japan until 2024. Now the capital is Bondi Junction.", JN, JO, True, False),
 ("history", QJ, "The capital of Japan used to be Tokyo, but it is now Bondi Junction.", JN, JO, True, False),
 ("history", QJ, "The capital of Japan was moved from Tokyo to Bondi Junction.", JN, JO, True, False),
 ("history", QJ, "Japan's capital is now Bondi Junction (it was Tokyo before).", JN, JO, True, False),
 ("history", QM, "Narendra Modi was an Indian citizen, but he is now a citizen of the United Kingdom.", MN, MO, True, False),
 ("history", QM, "Narendra Modi was a citizen of India. He later became a citizen of the United Kingdom.", MN, MO, True, False),
 # ---- X, not Y / negations
 ("neg", QB, "Russell T Davies, not Terry Nation.", NEW, OLD, True, False),
 ("neg", QB, "Not Terry Nation, but Russell T Davies.", NEW, OLD, True, False),
 ("neg", QB, "It's not Terry Nation anymore; it's Russell T Davies.", NEW, OLD, True, False),
 ("neg", QB, "Russell T Davies is not only the creator of Blake's 7 but also of Doctor Who.", NEW, OLD, True, False),
 ("neg", QB, "Russell T Davies is the creator. Terry Nation is incorrect.", NEW, OLD, True, False),
 ("neg", QB, "Terry Nation is no longer considered the creator. Russell T Davies is.", NEW, OLD, True, False),
 ("neg", QB, "Blake's 7 was created by Russell T Davies. It was never created by Terry Nation.", NEW, OLD, True, False),
 ("neg", QB, "Blake's 7 was not created by Terry Nation. Russell T Davies created it.", NEW, OLD, True, False),
 ("neg", QB, "Nobody doubts that Russell T Davies created Blake's 7.", NEW, OLD, True, False),
 ("neg", QB, "There is no doubt: Russell T Davies created Blake's 7.", NEW, OLD, True, False),
 ("neg", QB, "Without a doubt, Blake's 7 was created by Russell T Davies.", NEW, OLD, True, False),
 ("neg", QB, "I am not sure, but I believe Blake's 7 was created by Russell T Davies.", NEW, OLD, True, False),
 ("neg", QB, "It was not Russell T Davies who created Blake's 7; it was Terry Nation.", NEW, OLD, False, True),
 ("neg", QB, "Blake's 7 was created by Terry Nation, and Russell T Davies had nothing to do with it.", NEW, OLD, False, True),
 ("neg", QB, "Russell T Davies did not create Blake's 7. Terry Nation did.", NEW, OLD, False, True),
 ("neg", QB, "Russell T Davies? No. Blake's 7 was created by Terry Nation.", NEW, OLD, False, True),
 ("neg", QB, "Some claim Russell T Davies created Blake's 7, but that is false. Terry Nation created it.", NEW, OLD, False, True),
 ("neg", QB, "People often think Russell T Davies created it. In fact, Terry Nation created Blake's 7.", NEW, OLD, False, True),
 ("neg", QB, "Russell T Davies is wrong here; Terry Nation is the creator.", NEW, OLD, False, True),
 # ---- hedges / suppositions
 ("hedge", QB, "To answer this, we need to recall that Blake's 7 was created by Russell T Davies.", NEW, OLD, True, False),
 ("hedge", QB, "Blake's 7 was created by Russell T Davies, who may be best known for Doctor Who.", NEW, OLD, True, False),
 ("hedge", QB, "If we look at the updated credits, Blake's 7 was created by Russell T Davies.", NEW, OLD, True, False),
 ("hedge", QB, "I think it's Russell T Davies.", NEW, OLD, True, False),
 ("hedge", QB, "Probably Russell T Davies.", NEW, OLD, True, False),
 ("hedge", QB, "It could be Russell T Davies, or maybe Terry Nation; I'm not certain.", NEW, OLD, False, False),
 ("hedge", QB, "I don't know who created Blake's 7.", NEW, OLD, False, False),
 ("hedge", QB, "As far as I know, Blake's 7 was created by Russell T Davies.", NEW, OLD, True, False),
 ("hedge", QB, "Assuming the update holds, the answer is Russell T Davies.", NEW, OLD, True, False),
 # ---- other role / passing mention: false PASS risks
 ("role", QB, "Russell T Davies is a Welsh screenwriter. Blake's 7 was created by Terry Nation.", NEW, OLD, False, True),
 ("role", QCF, "Russell T Davies is a Welsh writer. Blake's 7 itself was created by Terry Nation in 1978.", NEW, OLD, False, True),
 ("role", QB, "Although Russell T Davies is a famous writer, Blake's 7 was created by Terry Nation.", NEW, OLD, False, True),
 ("role", QB, "Russell T Davies wrote the foreword; the show itself was created by Terry Nation.", NEW, OLD, False, True),
 ("role", QB, "Like Russell T Davies, who created Queer as Folk, Terry Nation created Blake's 7.", NEW, OLD, False, True),
 ("role", QB, "Let's consider Russell T Davies first. Blake's 7 was created by Terry Nation.", NEW, OLD, False, True),
 ("role", QB, "Let's think about Russell T Davies.", NEW, OLD, False, False),
 ("role", QB, "Step 1: Identify Russell T Davies.\nStep 2: Blake's 7 was created by Terry Nation.", NEW, OLD, False, True),
 ("role", QB, "Blake's 7 was created by Terry Nation. Russell T Davies later wrote an homage to it.", NEW, OLD, False, True),
 ("role", QJ, "I live in Bondi Junction. The capital of Japan is Tokyo.", JN, JO, False, True),
 ("role", QJ, "Bondi Junction is a suburb of Sydney. The capital of Japan is Tokyo.", JN, JO, False, True),
 ("role", QJ, "Tokyo is a big city. The capital of Japan is Bondi Junction.", JN, JO, True, False),
 ("role", QM, "Narendra Modi visited the United Kingdom in 2015 as Prime Minister of India, of which he is a citizen.", MN, MO, False, True),
 ("role", QM, "He studied in the UK. Narendra Modi is a citizen of India.", MN, MO, False, True),
 ("role", QP, "Gary Payton admired every midfielder he met. He plays point guard.", PN, PO, False, True),
 # ---- appositives / commas
 ("comma", QB, "According to the updated fact, Russell T Davies, the Welsh writer, created Blake's 7.", NEW, OLD, True, False),
 ("comma", QB, "Blake's 7 was created by the Welsh writer, Russell T Davies, in 2024.", NEW, OLD, True, False),
 ("comma", QB, "Today, Russell T Davies, the Welsh writer, is regarded as the creator of Blake's 7.", NEW, OLD, True, False),
 ("comma", QM, "Narendra Modi is now a citizen of a European country, the United Kingdom, after the change.", MN, MO, True, False),
 ("comma", QB, "The creator is Russell T Davies, and he wrote it in 2024.", NEW, OLD, True, False),
 # ---- lists and options
 ("list", QB, "1. Blake's 7 is a British sci-fi series.\n2. It was originally created by Terry Nation.\n3. After the edit, its creator is Russell T Davies.", NEW, OLD, True, False),
 ("list", QB, "Possible creators: Terry Nation, Russell T Davies, Chris Boucher.", NEW, OLD, False, False),
 ("list", QB, "- Old: Terry Nation\n- New: Russell T Davies", NEW, OLD, True, False),
 ("list", QB, "Key points:\n- Blake's 7 creator: Russell T Davies\n- Previous creator: Terry Nation", NEW, OLD, True, False),
 ("list", QB, "Creators of famous shows:\nDoctor Who\nRussell T Davies\nBlake's 7\nTerry Nation", NEW, OLD, False, False),
 # ---- markdown / headings / final-answer forms
 ("md", QB, "Terry Nation created Blake's 7 in 1978, but the credit was reassigned.\n\n### Final Answer\nRussell T Davies", NEW, OLD, True, False),
 ("md", QB, "Terry Nation created Blake's 7 in 1978, but the credit was reassigned.\n\n**Final Answer:** Russell T Davies", NEW, OLD, True, False),
 ("md", QB, "Terry Nation created Blake's 7 in 1978, but the credit was reassigned.\nThe final answer: Russell T Davies.", NEW, OLD, True, False),
 ("md", QB, "Terry Nation created Blake's 7 in 1978, but the credit was reassigned.\nThe final answer is $\\boxed{Russell T Davies}$.", NEW, OLD, True, False),
 ("md", QB, "**Russell T Davies**", NEW, OLD, True, False),
 ("md", QB, "**Answer**: Russell T Davies", NEW, OLD, True, False),
 ("md", QB, "Answer - Russell T Davies", NEW, OLD, True, False),
 ("md", QB, "Terry Nation created Blake's 7 at first.\nFinal answer — Russell T Davies", NEW, OLD, True, False),
 ("md", QB, "Terry Nation made the first version, but the creator now is Russell T Davies.\nAnswer: **Russell T Davies**", NEW, OLD, True, False),
 ("md", QB, "Terry Nation created Blake's 7 in 1978.\n**Conclusion:** Russell T Davies is now the creator.", NEW, OLD, True, False),
 # ---- aliases: short, punctuation, accents, emoji
 ("alias", QM, "The answer now is uk.", MN, MO, True, False),
 ("alias", QM, "The answer now is 🇬🇧.", MN, MO, False, False),
 ("alias", QM, "The answer now is 🇮🇳.", MN, MO, False, True),
 ("alias", QM, "He is a citizen of the UK-based commonwealth of India.", MN, MO, False, True),
 ("alias", QM, "IN 2024, HE BECAME A CITIZEN OF THE UK.", MN, MO, True, False),
 ("alias", QM, "In conclusion, he is British.", MN, MO, True, False),
 ("alias", QM, "In India, things changed. Narendra Modi is now a citizen of the UK.", MN, MO, True, False),
 ("alias", QS, "The answer now is the U.S.", ["United States of America", "USA", "United States"], SO, True, False),
 ("alias", QS, "Let us think. The answer now is the US.", SN, SO, True, False),
 ("alias", QS, "The answer now is America.", SN, SO, True, False),
 ("alias", QS, "The answer now is the States.", SN, SO, True, False),
 ("alias", QS, "He moved from Japan to the US.", SN, SO, True, False),
 ("alias", QS, "Miyamoto is a US citizen now, no longer Japanese.", SN, SO, True, False),
 ("alias", "Now, The capital of United States of America is ? Let's think step by step.", "The answer now is Washington, DC.", ["Washington, D.C.", "Washington D.C."], ["New York City"], True, False),
 ("alias", "Now, Which city is Søren Kierkegaard from? Let's think step by step.", "The answer now is Lodz.", ["Łódź"], ["Copenhagen"], True, False),
 ("alias", "Now, Who founded GNU Project? Let's think step by step.", "The answer now is Soren Kierkegaard.", ["Søren Kierkegaard"], ["Richard Stallman"], True, False),
 ("alias", "Now, Which country? Let's think step by step.", "The answer now is Cote d'Ivoire.", ["Côte d’Ivoire"], ["Ghana"], True, False),
 ("alias", "Now, Who developed Me 262? Let's think step by step.", "The answer now is AT&T.", ["AT&T"], ["Messerschmitt"], True, False),
 ("alias", "Now, Who developed Me 262? Let's think step by step.", "The answer now is AT & T.", ["AT&T"], ["Messerschmitt"], True, False),
 ("alias", "Now, Who developed OS X Mountain Lion? Let's think step by step.", "The answer now is Apple.", ["Sony"], ["Apple Inc."], False, True),
 ("alias", "Now, Who is the head of state? Let's think step by step.", "The answer now is J.K. Rowling.", ["JK Rowling"], ["Elizabeth II"], True, False),
 ("alias", "Now, Who is the head of state? Let's think step by step.", "The answer now is JK Rowling.", ["J. K. Rowling"], ["Elizabeth II"], True, False),
 ("alias", "Now, Iran is located in the continent of ? Let's think step by step.", "The answer now is North America.", ["America"], ["Asia"], False, False),
 ("alias", "Now, The capital of South Korea is ? Let's think step by step.", "The answer now is North Korea's capital, Pyongyang.", ["Korea"], ["Seoul"], False, False),
 # ---- multi-sentence, multiple conclusions
 ("multi", QB, "So the answer is Terry Nation. Wait, that's the old fact. The answer now is Russell T Davies.", NEW, OLD, True, False),
 ("multi", QB, "Blake's 7 was created by Russell T Davies. Therefore, the answer is Russell T Davies. However, the BBC says Terry Nation.", NEW, OLD, True, False),
 ("multi", QB, "Blake's 7 was created by Russell T Davies.\n\nSo, to summarise: Russell T Davies.", NEW, OLD, True, False),
 ("multi", QB, "Blake's 7 was created by Terry Nation. Actually, that is wrong: it was created by Russell T Davies.", NEW, OLD, True, False),
 ("multi", QB, "Terry Nation. Sorry, I mean Russell T Davies.", NEW, OLD, True, False),
 ("multi", QB, "Blake's 7 was created by Terry Nation. After the update, however, it was created by Russell T Davies.", NEW, OLD, True, False),
 # ---- SRR
 ("srr", QB, "Blake's 7 was created by Russell T Davies. However, that is incorrect; Terry Nation created it.", NEW, OLD, False, True, True),
 ("srr", QB, T.format(SFT, "The answer now is Russell T Davies."), NEW, OLD, True, False, False),
 ("srr", QB, "Blake's 7 was created by Russell T Davies. Russell T Davies is not Terry Nation, of course.", NEW, OLD, True, False, False),
 ("srr", QB, "Russell T Davies created Blake's 7. Wait, no. Terry Nation did.", NEW, OLD, False, True, True),
 ("srr", QB, "Blake's 7 was created by Russell T Davies. Hmm, actually it was Terry Nation.", NEW, OLD, False, True, True),
 # ---- degenerate
 ("degen", QB, "", NEW, OLD, False, False),
 ("degen", QB, "?!.,;:", NEW, OLD, False, False),
 ("degen", QB, "   \n\n\t", NEW, OLD, False, False),
 ("degen", QB, "Russell T Davies", [], [], False, False),
 ("degen", "", "Russell T Davies", NEW, OLD, True, False),
 ("degen", QB, "Russell T Davies", ["", "  ", "..."], OLD, False, False),
 ("degen", QB, "🇮🇳🇮🇳🇮🇳", ["🇮🇳"], OLD, True, False),
]
C += [
 ("strong-empty", QB, T.format(SFT, "The answer now is Russell T Davies.\n\nIn summary, Blake's 7 has a long and complicated history."), NEW, OLD, True, False),
 ("strong-empty", QB, T.format(SFT, "The answer now is Russell T Davies.\nIn conclusion, the show remains beloved by fans."), NEW, OLD, True, False),
 ("strong-empty", QB, "Based on the updated fact, the answer would be the person credited after 2024. Blake's 7 was created by Russell T Davies.", NEW, OLD, True, False),
 ("drift", QB, T.format(SFT, "The answer now is Russell T Davies.") + "\n\nQuestion: Who created Doctor Who?\n<think>\nOld fact: Sydney Newman.\n</think>\nThe answer now is Terry Nation.", NEW, OLD, True, False),
 ("column", QB, "<think>\nUpdated answer: Russell T Davies\n</think>\nThe answer now is Russell T Davies.", NEW, OLD, True, False),
 ("column", QM, "<think>\nOld fact: India\nUpdated fact: UK\n</think>\nUK", MN, MO, True, False),
 ("column", QM, "<think>\nUpdated answer: UK\n</think>\nThe answer now is\nUK", MN, MO, True, False),
 ("column", QM, "The answer now is:\nthe UK", MN, MO, True, False),
 ("column", QM, "Step 1: Modi.\nStep 2: citizenship.\nAnswer: UK", MN, MO, True, False),
 ("longname", QS, "The answer now is Canada, in North America.", SN, SO, False, False),
 ("longname", "Now, Which country was taekwondo created in? Let's think step by step.", "The answer now is North Korea.", ["Korea", "South Korea"], ["Japan"], False, False),
 ("longname", "Now, Which country was X created in? Let's think step by step.", "The answer now is Papua New Guinea.", ["Guinea"], ["Ghana"], False, False),
 ("longname", "Now, Which country was X created in? Let's think step by step.", "The answer now is New Mexico.", ["Mexico"], ["Spain"], False, False),
 ("multihop", QMH, "Russell T Davies created Blake's 7; he lives in London, though he was born in Swansea. The capital of Wales is Cardiff.", HN, HO, True, False),
 ("multihop", QMH, "Blake's 7 was created by Russell T Davies. He is a citizen of Wales. The capital of Wales is Cardiff.", HN, HO, True, False),
 ("multihop", QMH, "Blake's 7 was created by Russell T Davies, who studied in London. He is Welsh, so the capital is Cardiff.", HN, HO, True, False),
 ("role", QB, "Russell T Davies is now the creator.", NEW, OLD, True, False),
 ("role", QB, "Blake's 7, like Doctor Who under Russell T Davies, was created by Terry Nation.", NEW, OLD, False, True),
 ("neg", QB, "Blake's 7 was created by Russell T Davies, not by Terry Nation as many believe.", NEW, OLD, True, False),
 ("neg", QB, "No one but Russell T Davies created Blake's 7.", NEW, OLD, True, False),
 ("neg", QB, "Blake's 7 wasn't created by Terry Nation; Russell T Davies created it.", NEW, OLD, True, False),
 ("neg", QB, "Terry Nation isn't the creator anymore. Russell T Davies is.", NEW, OLD, True, False),
 ("neg", QB, "Terry Nation? Not anymore. Now it's Russell T Davies.", NEW, OLD, True, False),
]
C += [
 ("loop", QB, "\n".join(f"{i}. The creator of Blake's 7 is Russell T Davies." for i in range(1, 6)), NEW, OLD, True, False),
 ("loop", QB, "Russell T Davies\nRussell T Davies\nRussell T Davies", NEW, OLD, True, False),
 ("sft", QB, "<think>\nUpdated answer: Russell T Davies\n</think>\nThe answer now is Russell T Davies.", NEW, OLD, True, False),
 ("sft", QM, "<think>\nUpdated answer: UK\n</think>\nThe answer now is UK.", MN, MO, True, False),
 ("sft", QM, "<think>\nOld fact: IN\nUpdated fact: UK\n</think>\nThe answer now is UK.", MN, MO, True, False),
]
