"""`TrainedHead`: one action head of the learner's own model and the version it holds.

Who numbers versions: the head registry (fleet.learning.head_store.HeadStore, the HeadRegistry actor). It
hands out every number, and a rollback re-publishes an earlier payload under a new one, so the version
written inside a payload's metadata is not always the one it is served under. In the learner's process the
head's current version has one home, `model.head_versions[name]` (what the model's replies and payloads
carry), and one writer, this class: every install says which registry version it is. The learner, the
adapter, the rollout watch and the adapt experiment read `version` here and never write it.

No torch at import: the learner module (and so the launcher that validates a learner's config) imports this.
"""

from __future__ import annotations


class TrainedHead:
    """Head `name` of `model`: its tensors and version change only through `install` / `install_payload`.
    `changes` counts installs, so a cache of what the head scores knows when the head changed."""

    def __init__(self, model, name: str) -> None:
        if name not in model.specs:
            raise ValueError(f"TrainedHead: the model has no head {name!r}; it has {sorted(model.specs)}")
        self.model, self.name = model, name
        self.changes = 0

    @property
    def version(self) -> int:
        return int(self.model.head_versions[self.name])

    def module(self):
        """The head itself (the model's module: read it, train copies of it)."""
        return self.model.head(self.name)

    def state(self) -> dict:
        """A detached copy of the head's tensors (to put back with `install`)."""
        return self.model.head_state_dict(self.name)

    def payload(self) -> bytes:
        """The head as safetensors bytes, for the registry."""
        from fleet.policy.checkpoint import head_to_bytes  # torch: off the learner module's import path

        return head_to_bytes(self.model, self.name)

    def install(self, state: dict, version: int) -> None:
        """Make `state` the head, as registry version `version`."""
        self.model.load_head_state_dict(self.name, state, int(version))
        self.changes += 1

    def install_payload(self, payload: bytes, version: int) -> None:
        """Load registry `version`'s payload into the head. The payload's own metadata may name an older
        number (a rollback's bytes are the restored version's): the registry's `version` is the one kept."""
        from fleet.policy.checkpoint import head_from_bytes  # torch: off the learner module's import path

        head_from_bytes(self.model, self.name, payload)
        self.model.head_versions[self.name] = int(version)
        self.changes += 1
