"""The trainer's models: Hawk, the gated SSM and the prefix-LM Transformer.

`build_model(name, **config)` makes one from its config fields, e.g.
`build_model("hawk", vocab_size=8192, d_model=768, n_layers=12, bidirectional=True)`.
Every model's `forward(input_ids, attention_mask, segment_ids, position_ids)` takes the
objective server's packed arrays and returns logits; the SSMs also decode recurrently
(`init_state`, `prefill`, `step`).
"""

from __future__ import annotations

import dataclasses

from trainer.models.common import DecodeState, LanguageModel, RecurrentLM, SequenceMasks, lm_loss, sequence_masks
from trainer.models.gated_ssm import GatedSSMConfig, GatedSSMLM
from trainer.models.hawk import HawkConfig, HawkLM
from trainer.models.transformer import TransformerConfig, TransformerLM

MODELS: dict[str, tuple[type, type]] = {
    "hawk": (HawkConfig, HawkLM),
    "gated_ssm": (GatedSSMConfig, GatedSSMLM),
    "transformer": (TransformerConfig, TransformerLM),
}


def model_config(name: str, **config):
    """The config dataclass of model `name` with the given fields overridden."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    config_class = MODELS[name][0]
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"{name} has no config field(s) {unknown}; its fields are {sorted(fields)}")
    return config_class(**config)


def build_model(name: str, **config) -> LanguageModel:
    """A freshly initialised model `name` ("hawk", "gated_ssm" or "transformer")."""
    config_object = model_config(name, **config)
    return MODELS[name][1](config_object)


__all__ = [
    "MODELS",
    "DecodeState",
    "GatedSSMConfig",
    "GatedSSMLM",
    "HawkConfig",
    "HawkLM",
    "LanguageModel",
    "RecurrentLM",
    "SequenceMasks",
    "TransformerConfig",
    "TransformerLM",
    "build_model",
    "lm_loss",
    "model_config",
    "sequence_masks",
]
