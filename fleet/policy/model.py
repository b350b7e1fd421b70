"""`FleetPolicy`: the shared backbone plus one action head per embodiment, selected by name.

A mixed batch runs the backbone once; each head then runs once on its embodiment's rows. The model
works in normalized actions [-1, 1] and `predict` returns physical units.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fleet.embodiments import EmbodimentSpec
from fleet.policy.backbone import Backbone, PolicyConfig
from fleet.policy.batch import PolicyBatch, collate, denormalize_actions, normalize_actions
from fleet.policy.flow_head import FlowHead
from fleet.policy.heads import HeadBase
from fleet.policy.token_head import TokenHead
from fleet.policy.tokenizer import Vocabulary

# tensors an added head never copies from the body it is warm-started from: its own stem (another proprio), its
# word adapters (learnt online per head) and its token row (initialized separately)
_NOT_WARM_STARTED = ("stem.", "word_delta", "emb_token")


class TokenRows(dict):
    """{vocabulary id: (d,) Parameter}: the embodiment-token rows of bodies added after pretraining.

    The rows live in their heads (`head.emb_token`), never in the backbone's frozen table; the backbone reads
    them through this map (Backbone.embodiment_vectors). A copy of the backbone alone (a bf16 or int8 serving
    copy) shares the master's map, so a body added or a head swapped later is seen at once; a copy of the whole
    model gets its own map, linked to its own heads (FleetPolicy.__deepcopy__)."""

    def __deepcopy__(self, memo: dict) -> TokenRows:
        return self  # shared: a serving copy of the backbone sees bodies added to the master later, too


def make_head(spec: EmbodimentSpec, config: PolicyConfig) -> HeadBase:
    """The head an embodiment's spec asks for."""
    return TokenHead(spec, config) if spec.head == "token" else FlowHead(spec, config)


class FleetPolicy(nn.Module):
    """state_dict names: `backbone.*` (frozen after pretraining) and `heads.<embodiment>.*` (adapted)."""

    def __init__(
        self,
        config: PolicyConfig,
        specs: Mapping[str, EmbodimentSpec],
        vocab: Vocabulary,
        base_vocab_size: int | None = None,
    ) -> None:
        """base_vocab_size: rows of the backbone's embedding table (default: the whole vocabulary). Embodiment tokens
        at ids past it belong to bodies added after pretraining (`add_embodiment`): their rows live in their heads."""
        super().__init__()
        base = len(vocab) if base_vocab_size is None else base_vocab_size
        if not isinstance(base, int) or isinstance(base, bool) or not 2 <= base <= len(vocab):
            raise ValueError(f"FleetPolicy: base_vocab_size must be an int in [2, {len(vocab)}], got {base!r}")
        extra_words = [w for w in vocab.words[base:] if not (w.startswith("[EMB_") and w.endswith("]"))]
        if extra_words:
            raise ValueError(
                f"FleetPolicy: vocabulary entries past base_vocab_size must be embodiment tokens, got {extra_words}"
            )
        if not specs:
            raise ValueError("FleetPolicy: needs at least one embodiment spec")
        for name, spec in specs.items():
            if name != spec.name:
                raise ValueError(f"FleetPolicy: specs key {name!r} holds the spec of {spec.name!r}")
            if spec.token not in vocab:
                raise ValueError(f"FleetPolicy: the vocabulary has no embodiment token {spec.token}")
        self.config = config
        self.specs: dict[str, EmbodimentSpec] = dict(specs)
        self.vocab = vocab
        self.base_vocab_size = base
        self.backbone = Backbone(config, base)
        self.heads = nn.ModuleDict({name: make_head(spec, config) for name, spec in self.specs.items()})
        for name, head in self.heads.items():
            # the head's word adapters: a vector added to the embedding of each word, for this embodiment's rows
            # only. Pretraining leaves them zero (a buffer: no optimizer sees it); online adaptation learns the
            # rows of words pretraining never saw (novel object names), so instructions made of known words
            # stay bit-identical and the shared table is never touched (textual inversion, Gal et al. 2022)
            head.register_buffer("word_delta", torch.zeros(base, config.d_model))
            if self.is_added(name):
                head.emb_token = nn.Parameter(torch.zeros(config.d_model))
        self._link_token_rows()
        # the pretrained heads are version 1; each adapted head published by the learner increments it
        self.head_versions: dict[str, int] = dict.fromkeys(self.specs, 1)

    # ----- bodies added after pretraining --------------------------------------------------------------
    def is_added(self, name: str) -> bool:
        """Whether embodiment `name` joined after pretraining (its token row lives in its head)."""
        return self.vocab.token_id(self.specs[name].token) >= self.base_vocab_size

    @property
    def added_embodiments(self) -> list[str]:
        return [n for n in self.specs if self.is_added(n)]

    def _link_token_rows(self) -> None:
        rows = self.backbone.token_rows
        if not isinstance(rows, TokenRows):
            rows = self.backbone.token_rows = TokenRows()
        ids = {n: self.vocab.token_id(self.specs[n].token) for n in self.added_embodiments}
        rows.clear()  # in place: serving copies of the backbone share this map
        rows.update({i: self.heads[n].emb_token for n, i in ids.items()})

    def __deepcopy__(self, memo: dict) -> FleetPolicy:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new.backbone.token_rows = TokenRows()  # not the shared map of the original
        new._link_token_rows()  # the copy's backbone reads the copy's heads
        return new

    def add_embodiment(self, spec: EmbodimentSpec, like: str | None = None, seed: int = 0) -> HeadBase:
        """Give the model a new body: a new embodiment-token row, proprio stem and head (token or flow, from the
        spec), at head version 0 (untrained). No existing tensor is touched: the backbone's table keeps its rows
        (the new row lives in the head, like the word adapters), every other head stays bit-identical.

        like: a body of this model to warm-start from: its token row, and every head tensor of the same shape
        (decoder, step positions, direct path; not its stem or word adapters). None: the mean of the pretrained
        token rows and a fresh head. Returns the new head; its parameters are what training may change.
        """
        if not isinstance(spec, EmbodimentSpec):
            raise TypeError(f"add_embodiment: expected an EmbodimentSpec, got {type(spec).__name__}")
        if spec.name in self.specs:
            raise ValueError(f"add_embodiment: this model already has embodiment {spec.name!r}")
        if like is not None and like not in self.specs:
            raise ValueError(f"add_embodiment: like={like!r} is not a body of this model; it has {sorted(self.specs)}")
        if spec.token in self.vocab and self.vocab.token_id(spec.token) < self.base_vocab_size:
            raise ValueError(f"add_embodiment: {spec.token} has a pretrained row; load its head instead")
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            head = make_head(spec, self.config)  # refuses a chunk_size the config does not have
        d = self.config.d_model
        head.register_buffer("word_delta", torch.zeros(self.base_vocab_size, d))
        with torch.no_grad():
            table = self.backbone.word_embed.weight
            if like is None:
                pretrained = [self.vocab.token_id(s.token) for n, s in self.specs.items() if not self.is_added(n)]
                row = table[pretrained].mean(0) if pretrained else torch.zeros(d)
            else:
                row = self.embodiment_row(like)
                own = head.state_dict()
                for key, value in self.head(like).state_dict().items():
                    if key in own and not key.startswith(_NOT_WARM_STARTED) and value.shape == own[key].shape:
                        own[key].copy_(value)
            head.emb_token = nn.Parameter(row.detach().clone().float())
        if spec.token not in self.vocab:
            self.vocab = Vocabulary([*self.vocab.words, spec.token])
        self.specs[spec.name] = spec
        self.heads[spec.name] = head.to(self.backbone.word_embed.weight.device)
        self.head_versions[spec.name] = 0
        self._link_token_rows()
        return head

    def mark_rtc_trained(self, name: str) -> None:
        """Record that head `name` learned training-time RTC (fleet.learning.rtc_round): `PolicyConfig.rtc_trained`
        gains it, so checkpoints carry it and its flow head clamps committed steps from now on. A flow head also
        joins `PolicyConfig.flow_execute_sample`: it executes its first sample, not the mean of its K. Its samples
        continue one committed prefix but can disagree on when a gripper closes (the gripper is where the head
        errs most), and a mean of such samples closes it slowly. aloha, 4 rounds, seed block 15, 100 episodes per
        delay: rtc 84 / 44 / 24 / 3 % with the mean and 95 / 83 / 48 / 15 % with the first sample, at 0 / 1 / 2 / 3
        ticks (README, "Training-time RTC")."""
        if name not in self.specs:
            raise ValueError(f"mark_rtc_trained: no embodiment {name!r}; this model has {sorted(self.specs)}")
        execute = set(self.config.flow_execute_sample) | ({name} if self.specs[name].head == "flow" else set())
        config = dataclasses.replace(
            self.config,
            rtc_trained=tuple(sorted({*self.config.rtc_trained, name})),
            flow_execute_sample=tuple(sorted(execute)),
        )
        self.config = self.backbone.config = config
        for head in self.heads.values():
            head.config = config

    def remove_embodiment(self, name: str) -> None:
        """Undo `add_embodiment` (a failed install); pretrained bodies cannot be removed. The vocabulary keeps the
        token (an unused id), so adding the body again reuses it."""
        if name not in self.specs or not self.is_added(name):
            raise ValueError(f"remove_embodiment: {name!r} is not a body added to this model")
        del self.heads[name]
        del self.specs[name]
        del self.head_versions[name]
        self._link_token_rows()

    def embodiment_row(self, name: str) -> torch.Tensor:
        """(d,) the token row of embodiment `name` (the backbone's table, or the head's own for an added body)."""
        if self.is_added(name):
            return self.head(name).emb_token.detach()
        return self.backbone.word_embed.weight[self.vocab.token_id(self.specs[name].token)].detach()

    @property
    def embodiment_names(self) -> list[str]:
        return list(self.specs)

    def head(self, name: str) -> HeadBase:
        if name not in self.heads:
            raise ValueError(f"no head for embodiment {name!r}; this model has {sorted(self.heads)}")
        return self.heads[name]

    # ----- actions ---------------------------------------------------------------------------------
    def normalize_actions(self, name: str, actions: np.ndarray) -> np.ndarray:
        """(..., D) physical -> (..., D) float32 normalized, clipped to [-1, 1]."""
        return normalize_actions(self.specs[name], actions)

    def denormalize_actions(self, name: str, normalized: np.ndarray) -> np.ndarray:
        """(..., D) normalized -> (..., D) float32 physical units."""
        return denormalize_actions(self.specs[name], normalized)

    def set_proprio_stats(self, name: str, mean: np.ndarray, std: np.ndarray) -> None:
        """Standardization of embodiment `name`'s proprio (P,) before its stem; training sets it from data."""
        self.head(name).stem.set_stats(torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std).float())

    # ----- forward -----------------------------------------------------------------------------------
    def collate(
        self, observations: Sequence[Mapping], embodiments: Sequence[str], actions: Sequence[np.ndarray] | None = None
    ) -> PolicyBatch:
        """`batch.collate` with this model's vocabulary, specs and instruction length."""
        return collate(observations, embodiments, self.vocab, self.specs, actions, self.config.max_instr_len)

    def encode(
        self, batch: PolicyBatch, word_deltas: Mapping[str, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backbone once for the whole mixed batch -> memory (B, S, d), pad_mask (B, S) True=padding, pooled (B, d).
        word_deltas: word-adapter tables to use instead of the heads' own (`word_vectors`)."""
        groups = batch.groups()
        d = self.config.d_model
        proprio_tok = batch.proprio.new_zeros(len(batch), d)
        for name, idx in groups.items():
            stem = self.head(name).stem
            p = self.specs[name].proprio_dim
            proprio_tok = proprio_tok.index_copy(0, idx, stem(batch.proprio.index_select(0, idx)[:, :p]))
        words = self.word_vectors(batch, word_deltas)
        return self.backbone(batch.image, batch.emb_idx, proprio_tok, batch.instr_ids, words)

    def word_vectors(
        self, batch: PolicyBatch, deltas: Mapping[str, torch.Tensor | None] | None = None
    ) -> torch.Tensor | None:
        """(B, L, d) word vectors with each row's head word adapters added, or None when no row's head has any
        (the backbone then embeds the ids itself). `deltas` overrides heads' tables ({name: (V, d) or None})."""
        groups = batch.groups()
        tables = {}
        for name in groups:
            table = deltas[name] if deltas is not None and name in deltas else self.head(name).word_delta
            if table is not None and (table.requires_grad or bool(table.any())):
                tables[name] = table
        if not tables:
            return None
        words = self.backbone.word_embed(batch.instr_ids)
        for name, table in tables.items():
            idx = groups[name]
            words = words.index_add(0, idx, table[batch.instr_ids.index_select(0, idx)].to(words.dtype))
        return words

    def action_loss(
        self, batch: PolicyBatch, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, dict[str, float]]]:
        """Mean over the embodiments present of each head's loss on its rows.

        Token heads: cross-entropy of the target bins; flow heads: flow-matching MSE (noise and times
        from `generator`). Metrics: {embodiment: {"loss": float, "rows": n, ...head-specific}}.
        """
        if batch.actions is None:
            raise ValueError("action_loss: the batch has no actions (pass actions to collate)")
        memory, pad_mask, _ = self.encode(batch)
        losses, metrics = [], {}
        for name, idx in batch.groups().items():
            head = self.head(name)
            target = batch.actions.index_select(0, idx)[:, :, : head.action_dim]
            loss, extra = head.loss(memory.index_select(0, idx), pad_mask.index_select(0, idx), target, generator)
            losses.append(loss)
            metrics[name] = {"loss": float(loss.detach()), "rows": int(idx.numel()), **extra}
        total = torch.stack(losses).mean()
        kp = getattr(self.backbone.vision, "kp", None)
        if batch.focus is not None and self.config.aux_focus_weight > 0 and kp is not None:
            err = (kp.last_query_xy - batch.focus).square().sum(-1)  # (B,) squared image-coordinate error
            total = total + self.config.aux_focus_weight * err.mean()
            for name, idx in batch.groups().items():
                metrics[name]["focus_err"] = float(err.detach().index_select(0, idx).sqrt().mean())
        return total, metrics

    @torch.inference_mode()
    def predict(
        self,
        batch: PolicyBatch,
        n_samples: int = 1,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[dict]:
        """One dict per row (numpy float32):

        chunk (T, D) physical units; features (d,) pooled backbone feature; head_version; embodiment;
        token heads: entropy (T, D) nats and probs (T, D) of the chosen bins;
        flow heads with n_samples > 1: samples (K, T, D) normalized units (the chunk is their mean).
        """
        if n_samples < 1:
            raise ValueError(f"predict: n_samples must be >= 1, got {n_samples}")
        memory, pad_mask, pooled = self.encode(batch)
        features = pooled.numpy()
        rows: list[dict] = [{} for _ in range(len(batch))]
        for name, idx in batch.groups().items():
            opts = batch.head_options(self.specs[name], idx, n_samples)  # per-row K and prefixes (rtc.py)
            out = self.head(name).predict(
                memory.index_select(0, idx), pad_mask.index_select(0, idx), n_samples, temperature, generator, **opts
            )
            ks = out["row_samples"].tolist() if "row_samples" in out else [n_samples] * len(idx)
            chunks = self.denormalize_actions(name, out["chunk"].numpy())
            entropy = out["entropy"].numpy() if "entropy" in out else None
            probs = out["probs"].numpy() if "probs" in out else None
            samples = out["samples"].numpy() if "samples" in out and max(ks) > 1 else None
            for j, i in enumerate(idx.tolist()):
                row = {
                    "chunk": chunks[j],
                    "features": features[i],
                    "head_version": self.head_versions[name],
                    "embodiment": name,
                }
                if entropy is not None:
                    row["entropy"], row["probs"] = entropy[j], probs[j]
                if samples is not None and ks[j] > 1:
                    row["samples"] = samples[j, : ks[j]]
                rows[i] = row
        return rows

    def predict_obs(
        self,
        observations: Sequence[Mapping],
        embodiments: Sequence[str],
        n_samples: int = 1,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[dict]:
        """`predict` on raw observation dicts (validated by `collate`)."""
        return self.predict(self.collate(observations, embodiments), n_samples, temperature, generator)

    # ----- heads as separable state ------------------------------------------------------------------
    def freeze_backbone(self) -> None:
        """Stop gradients into the backbone (vision, word and embodiment embeddings, transformer)."""
        self.backbone.requires_grad_(False)

    def trainable_head_parameters(self, name: str) -> list[nn.Parameter]:
        """Everything embodiment `name` trains by gradient: its proprio stem, decoder and output layer (its word
        adapters are a buffer: only online adaptation learns them, HeadAdapter)."""
        return list(self.head(name).parameters())

    def head_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """A detached copy of head `name`'s tensors (names relative to the head, buffers included)."""
        return {k: v.detach().clone() for k, v in self.head(name).state_dict().items()}

    def load_head_state_dict(self, name: str, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace head `name` with `state` and record `version`; refuses missing/unexpected/misshapen tensors."""
        own = self.head(name).state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"head {name!r}: missing tensors {missing}, unexpected tensors {unexpected}")
        for key, ref in own.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ValueError(
                    f"head {name!r}: tensor {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
                )
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"head {name!r}: version must be a non-negative int, got {version!r}")
        self.head(name).load_state_dict(dict(state), strict=True)
        self.head_versions[name] = version
