"""Ray actors: thin adapters over `fleet` (robots, replay, learner)."""
