"""Online learning from the fleet's corrections (no Ray; torch only where a round trains).

learner.py       Learner: a round every N corrections, publish if no worse, watch the rollout, roll back
rollout.py       judge_rollout: did the fleet do worse on the new head?
adapt.py         HeadAdapter: one head-only adaptation round (torch)
adapt_config.py  AdaptConfig: the knobs of a round (no torch)
adapt_data.py    corrections -> training rows, the rehearsal set, the head's loss
head_store.py    HeadStore: every published head version, persisted (the HeadRegistry actor's logic)
"""
