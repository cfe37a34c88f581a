"""The frozen model configuration, read from and written to transformers' `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("mistral", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)
DTYPES = ("float32", "bfloat16")


class ModelConfigError(ValueError):
    """A checkpoint's configuration that this implementation cannot honour."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Mistral/Llama decoder (the fields both transformers configs share).

    `sliding_window=None` is full causal attention (Llama, Mistral v0.2+); an int limits each
    query to the `sliding_window` most recent positions, itself included (transformers' rule).
    `rope_scaling` is a tuple of (key, value) pairs so the config stays hashable (a jit static).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    model_type: str = "mistral"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"unsupported model_type {self.model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelConfigError(f"sliding_window={self.sliding_window} must be positive or null")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"rope_scaling type {rope_type!r} is not implemented; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)} (or rope_scaling: null)"
            )

    @property
    def rope_type(self) -> str:
        scaling = dict(self.rope_scaling or ())
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    # ----------------------------------------------------------------- transformers interop
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Reads a transformers MistralConfig / LlamaConfig dict, rejecting what we cannot run."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ModelConfigError(f"unsupported model_type {model_type!r}; supported: {supported}")
        act = cfg.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ModelConfigError(f"unsupported hidden_act {act!r}; supported: silu")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ModelConfigError(
                    f"{flag}=true is not supported (Mistral/Llama have no biases)"
                )
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise ModelConfigError(
                f"pretraining_tp={cfg['pretraining_tp']} is not supported; use 1"
            )
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        if model_type == "mistral" and cfg.get("use_sliding_window") is False:
            window = None
        eos = cfg.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        params = cfg.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            sliding_window=window,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
            model_type=model_type,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ModelConfigError(f"config file not found: {path}")
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
        except KeyError as e:
            raise ModelConfigError(f"{path} lacks the required field {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers config.json for this architecture."""
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        eos = list(self.eos_token_id)
        out = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        }
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        else:
            out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        return out
