"""Online learning from the fleet's corrections (no Ray; torch only where a round trains).

learner.py          Learner, LearnerConfig: a round every N corrections, publish if no worse, the status
learner_state.py    LearnerState: cursors, event history and counters that survive a restart
outcomes.py         OutcomeLog: the robots' episode outcomes (fleet.protocol.EpisodeOutcome) per head version
rollout.py          judge_rollout, RolloutWatch: did the fleet do worse on the new head? roll back if so
trained_head.py     TrainedHead: a head of the learner's model and its version (the one writer of both)
head_adapter.py     HeadAdapter: one head-only adaptation round (torch), built from the modules below
round_config.py     AdaptConfig: the knobs of a round (no torch)
round_data.py       corrections -> training rows with cached memory, the rehearsal set, a head's pools
head_training.py    the training step: batch mix, optimizer, word-adapter rows
candidate_gate.py   a candidate's scores (loss, executed-action error) and the gate before publishing
calibration.py      hardware changes: the command offset the rehearsal labels follow
word_adapters.py    instruction words the rehearsal set never uses, adapted per head
head_store.py       HeadStore: every published head version, persisted (the HeadRegistry actor's logic)
rtc_round.py        training-time real-time chunking: DAgger rows under delay, a head taught to continue a
                    committed prefix (`fleet rtc-finetune`)
"""
