"""The head store: every published version of every action head, as safetensors bytes (no Ray).

    store = HeadStore(persist_dir="runs/heads")
    v = store.publish("franka", None, head_to_bytes(model, "franka"), {"loss": 0.1})
    store.latest()            # {"franka": v}

The HeadRegistry actor (actors/heads.py) is this class on Ray. The learner publishes; every PolicyServer
replica polls `latest()` and installs what is newer. Versions only ever increase: a rollback re-publishes an
earlier payload under a new number. With `persist_dir`, each version is written (fleet.durable: temporary
name, fsync, rename) before `publish` returns, and a restarted store reloads them.

It also keeps each robot's image adapter (fleet.policy.image_adapter: the colour and offset that bring its
camera back to the rig's), one table with one version number: the learner sets an entry, replicas poll
`image_adapters(known_version)` and apply each robot's to its own frames only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from fleet.durable import write_bytes_atomic, write_text_atomic
from fleet.learning.head_check import check_head_payload
from fleet.validate import check_int

MAX_PAYLOAD_BYTES = 64 << 20
# a head is < 2 MB; anything far larger is a mistake, not a head
MAX_VERSIONS = 100
# versions kept per head (in memory and on disk); the oldest go first
MAX_IMAGE_ADAPTERS = 4096
# robots with an image adapter; a flood of robot ids beyond it is refused, never grows the table
ADAPTERS_FILE = "image_adapters.json"
FORGET_REPLICA_S = 3600.0
# a replica that has not reported for this long is forgotten (restarted replicas get new ids)


class HeadStore:
    """Versioned head payloads per embodiment (the actor's state; usable without Ray)."""

    def __init__(self, persist_dir: str | os.PathLike | None = None) -> None:
        self.persist_dir = Path(persist_dir).resolve() if persist_dir else None
        self._payloads: dict[str, dict[int, bytes]] = {}
        self._meta: dict[str, dict[int, dict]] = {}
        self._serving: dict[str, dict] = {}
        self._checked: dict[str, dict] = {}  # name -> check_head_payload of its newest version: the next must match
        self.refused_publishes = 0
        self.skipped_at_load: list[str] = []  # persisted files that could not be loaded (torn, foreign, corrupt)
        self._adapters: dict[str, dict] = {}  # robot id -> {"adapter": ImageAdapter dict, "meta", "set_at"}
        self._adapters_version = 0
        if self.persist_dir is not None:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
            self._reload()
            self._reload_adapters()

    # ----- persistence ---------------------------------------------------------------------------
    def _reload(self) -> None:
        """Load every version whose metadata file exists (it is written last, so it marks a whole version)."""
        for meta_path in sorted(self.persist_dir.glob("*/v*.json")):
            name, stem = meta_path.parent.name, meta_path.stem
            try:
                meta = json.loads(meta_path.read_text())
                payload = (meta_path.parent / f"{stem}.safetensors").read_bytes()
                version = int(meta["version"])
                if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
                    raise ValueError("sha256 differs from the payload's")
                info = check_head_payload(payload, name)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # a torn or foreign file: skip it, keep the rest
                self.skipped_at_load.append(f"{meta_path}: {type(exc).__name__}: {exc}")
                continue
            self._payloads.setdefault(name, {})[version] = payload
            self._meta.setdefault(name, {})[version] = meta
            if version >= max(self._payloads[name]):
                self._checked[name] = info

    def _persist(self, name: str, version: int, payload: bytes, meta: dict) -> None:
        if self.persist_dir is None:
            return
        folder = self.persist_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / f"v{version:06d}.safetensors", payload)
        write_bytes_atomic(folder / f"v{version:06d}.json", json.dumps(meta).encode())

    def _forget(self, name: str, version: int) -> None:
        self._payloads[name].pop(version, None)
        self._meta[name].pop(version, None)
        if self.persist_dir is not None:
            for suffix in (".json", ".safetensors"):  # metadata first: a half-deleted version is never loaded
                (self.persist_dir / name / f"v{version:06d}{suffix}").unlink(missing_ok=True)

    # ----- API -----------------------------------------------------------------------------------
    def publish(self, name: str, version: int | None, payload: bytes, meta: dict | None = None) -> int:
        """Store `payload` as head `name` at `version` (None = latest + 1); returns the version.

        Refuses (ValueError, counted in `refused_publishes`) a payload `check_head_payload` refuses: bad
        metadata, non-finite weights, tensors or spec unlike the current version's. Refuses a version not
        above the latest, unless it is the same payload again (a retried call), which returns the version.
        Durable before it returns when persisting."""
        try:
            return self._publish(name, version, payload, meta)
        except ValueError:  # HeadPayloadError included
            self.refused_publishes += 1
            raise
        except TypeError as exc:
            self.refused_publishes += 1
            raise ValueError(f"publish {name!r}: {exc}") from None

    def _publish(self, name: str, version: int | None, payload: bytes, meta: dict | None) -> int:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"publish: name must be an embodiment name, got {name!r}")
        if not isinstance(payload, (bytes, bytearray)) or not 0 < len(payload) <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"publish {name!r}: payload must be 1..{MAX_PAYLOAD_BYTES} bytes of safetensors")
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(k, str) for k in meta)):
            raise ValueError(f"publish {name!r}: meta must be None or a mapping with string keys")
        payload = bytes(payload)
        info = check_head_payload(payload, name, reference=self._checked.get(name))
        sha = hashlib.sha256(payload).hexdigest()
        latest = self.latest().get(name, 0)
        if version is None:
            version = latest + 1
        check_int(f"publish {name!r}: version", version, lo=1, expected="a positive int")
        if version <= latest:
            if self._meta.get(name, {}).get(version, {}).get("sha256") == sha:
                return version  # the same publish retried after a restart: already durable
            raise ValueError(f"publish {name!r}: version {version} is not above the latest {latest}")
        record = {
            "name": name,
            "version": version,
            "sha256": sha,
            "bytes": len(payload),
            "published_at": time.time(),
            "meta": dict(meta or {}),
        }
        try:
            json.dumps(record, allow_nan=False)  # refuse a meta that cannot be stored before anything is written
        except (TypeError, ValueError) as exc:
            raise ValueError(f"publish {name!r}: meta must be plain JSON with finite numbers ({exc})") from None
        self._persist(name, version, payload, record)
        self._payloads.setdefault(name, {})[version] = payload
        self._meta.setdefault(name, {})[version] = record
        self._checked[name] = info
        while len(self._payloads[name]) > MAX_VERSIONS:
            self._forget(name, min(self._payloads[name]))
        return version

    def latest(self) -> dict[str, int]:
        """{embodiment: newest version}."""
        return {name: max(versions) for name, versions in self._payloads.items() if versions}

    def get(self, name: str, version: int | None = None) -> tuple[int, bytes]:
        """(version, payload) of head `name` at `version` (None = latest); KeyError if absent."""
        versions = self._payloads.get(name) or {}
        if not versions:
            raise KeyError(f"no published head {name!r}; published: {sorted(self._payloads)}")
        version = max(versions) if version is None else version
        if version not in versions:
            raise KeyError(f"head {name!r} has no version {version}; kept: {sorted(versions)}")
        return version, versions[version]

    def history(self, name: str) -> list[dict]:
        """Records of head `name`, oldest first: version, sha256, bytes, published_at, meta."""
        return [dict(self._meta[name][v]) for v in sorted(self._meta.get(name, {}))]

    def rollback(self, name: str, to_version: int) -> int:
        """Re-publish the payload of `to_version` as a new, higher version; returns that version."""
        _, payload = self.get(name, to_version)
        return self.publish(name, None, payload, {"rollback_of": int(to_version)})

    def report_serving(
        self, replica: str, versions: dict[str, int], endpoint: dict | None = None, refused: list | None = None
    ) -> None:
        """A serving replica says which head versions it now serves (shown by `serving`), which it refused to
        install (`refused`: [{"embodiment", "version", "error"}]) and, when it has one, where its direct socket
        listens (`endpoints`). Replicas report every couple of seconds."""
        now = time.time()
        self._serving = {r: v for r, v in self._serving.items() if now - v["at"] <= FORGET_REPLICA_S}
        self._serving[str(replica)] = {
            "versions": dict(versions),
            "at": now,
            "endpoint": endpoint,
            "refused": list(refused or []),
        }

    def rollout_state(self, name: str, version: int, max_age_s: float = 10.0) -> dict:
        """Where head `name` v`version` stands on the replicas alive within `max_age_s`: {"replicas",
        "installed" (serving it or newer), "refused" ([{"replica", "error"}]), "everywhere" (every replica
        installed it, and at least one is alive)}. The learner judges a rollout only once it is everywhere."""
        alive = self.serving(max_age_s)
        installed = sorted(r for r, v in alive.items() if int(v["versions"].get(name, 0)) >= version)
        refused = [
            {"replica": r, "error": x.get("error")}
            for r, v in sorted(alive.items())
            for x in v.get("refused", [])
            if isinstance(x, dict) and x.get("embodiment") == name and x.get("version") == version
        ]
        everywhere = bool(alive) and len(installed) == len(alive)
        return {"replicas": len(alive), "installed": installed, "refused": refused, "everywhere": everywhere}

    def serving(self, max_age_s: float = 60.0) -> dict[str, dict]:
        """{replica: {"versions", "at", "endpoint"}} for replicas that reported within `max_age_s`."""
        now = time.time()
        return {r: dict(v) for r, v in self._serving.items() if now - v["at"] <= max_age_s}

    def endpoints(self, node_id: str | None = None, max_age_s: float = 10.0) -> list[dict]:
        """Direct sockets of the replicas alive within `max_age_s` (sorted by replica), those on `node_id`
        only when given: a loopback address is reachable from its own node alone."""
        return [
            dict(v["endpoint"])
            for _, v in sorted(self.serving(max_age_s).items())
            if v.get("endpoint") and (node_id is None or v["endpoint"].get("node_id") == node_id)
        ]

    def stats(self) -> dict:
        """What the store refused and skipped: publishes refused since start, files skipped at load."""
        return {
            "pid": os.getpid(),
            "latest": self.latest(),
            "refused_publishes": self.refused_publishes,
            "skipped_at_load": list(self.skipped_at_load),
        }

    def check_health(self) -> bool:
        return True

    # ----- per-robot image adapters --------------------------------------------------------------
    def _reload_adapters(self) -> None:
        path = self.persist_dir / ADAPTERS_FILE
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
            table = {str(r): self._checked_adapter_entry(r, e) for r, e in dict(saved["robots"]).items()}
            self._adapters, self._adapters_version = table, int(saved["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.skipped_at_load.append(f"{path}: {type(exc).__name__}: {exc}")

    @staticmethod
    def _checked_adapter_entry(robot_id: object, entry: object) -> dict:
        from fleet.policy.image_adapter import ImageAdapter  # numpy only

        if not isinstance(entry, dict) or "adapter" not in entry:
            raise ValueError(f"image adapter of {robot_id!r}: expected {{'adapter': ..., 'meta': ...}}")
        return {
            "adapter": ImageAdapter.from_dict(entry["adapter"]).to_dict(),
            "meta": dict(entry.get("meta") or {}),
            "set_at": float(entry.get("set_at", time.time())),
        }

    def set_image_adapter(self, robot_id: str, adapter: dict | None, meta: dict | None = None) -> int:
        """Set (or with None remove) robot `robot_id`'s image adapter (an ImageAdapter dict, validated); returns
        the table's new version. Durable before it returns when persisting."""
        if not isinstance(robot_id, str) or not robot_id or len(robot_id) > 200:
            raise ValueError(f"set_image_adapter: robot_id must be a non-empty string, got {robot_id!r}")
        table = dict(self._adapters)
        if adapter is None:
            if robot_id not in table:
                return self._adapters_version
            del table[robot_id]
        else:
            if robot_id not in table and len(table) >= MAX_IMAGE_ADAPTERS:
                raise ValueError(f"set_image_adapter: already {MAX_IMAGE_ADAPTERS} robots with an adapter")
            entry = self._checked_adapter_entry(robot_id, {"adapter": adapter, "meta": meta, "set_at": time.time()})
            try:
                json.dumps(entry, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"set_image_adapter {robot_id!r}: meta must be plain JSON ({exc})") from None
            table[robot_id] = entry
        version = self._adapters_version + 1
        if self.persist_dir is not None:
            text = json.dumps({"version": version, "robots": table})
            write_text_atomic(self.persist_dir / ADAPTERS_FILE, text)
        self._adapters, self._adapters_version = table, version
        return version

    def image_adapters(self, known_version: int | None = None) -> dict | None:
        """{"version", "adapters": {robot id: ImageAdapter dict}}, or None when `known_version` is current
        (a replica's poll costs one small reply)."""
        if known_version is not None and known_version == self._adapters_version:
            return None
        return {
            "version": self._adapters_version,
            "adapters": {r: dict(e["adapter"]) for r, e in self._adapters.items()},
        }

    def image_adapter_history(self) -> dict[str, dict]:
        """{robot id: {"adapter", "meta", "set_at"}}: what `fleet status` and the learner show."""
        return {
            r: {"adapter": dict(e["adapter"]), "meta": dict(e["meta"]), "set_at": e["set_at"]}
            for r, e in self._adapters.items()
        }
