"""What a static RoPE scaling is, in Hugging Face's terms and in Megatron's flags (no torch).

One description, ``RopeScaling``, read from and written to

  - a HF ``rope_scaling`` / ``rope_parameters`` dict (``from_hf`` / ``to_hf``), and
  - our ``ModelConfig`` fields, which are the training flags' dests and ``model_args.json`` keys
    (``from_model_fields`` / ``model_fields``).

Types and their flags (Megatron-LM's names where Megatron-LM has the setting):

  linear  ``--rotary-seq-len-interpolation-factor F``
  llama3  ``--use-rope-scaling --rope-scaling-factor F``; Megatron-LM fixes the low / high
          frequency factors (1, 4) and the original context (8192); ours may carry any:
          ``--rope-scaling-low-freq-factor``, ``--rope-scaling-high-freq-factor``,
          ``--rope-scaling-original-max-position-embeddings`` (our flags, Megatron-LM has none).
  yarn    ``--position-embedding-type yarn --rotary-scaling-factor F
          --yarn-original-max-position-embeddings L [--yarn-beta-fast --yarn-beta-slow --mscale
          --mscale-all-dim --no-yarn-correction-range-round-to-int]`` (Megatron-LM's), plus
          ``--yarn-attention-factor`` (ours: HF's explicit ``attention_factor``).

Dynamic NTK stays refused: its base changes with each batch's largest position id, which
skip-wise positions (PoSE, LongRecipe) change per sample; ``tools/rope_base.py`` gives a static base.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

from megatron_ext.errors import UserError

ROPE_TYPES = ("linear", "llama3", "yarn")

# HF's defaults for the optional YaRN keys (transformers' _compute_yarn_parameters).
YARN_HF_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
                    "attention_factor": None, "truncate": True}

# ModelConfig's RoPE fields and their defaults (no scaling). The flags in arguments.py and the
# dataclass in config.py use the same defaults; tests/test_config.py checks the two agree.
MODEL_FIELD_DEFAULTS = {
    "position_embedding_type": "rope",
    "use_rope_scaling": False,
    "rope_scaling_factor": 8.0,
    "rope_scaling_low_freq_factor": 1.0,
    "rope_scaling_high_freq_factor": 4.0,
    "rope_scaling_original_max_position_embeddings": 8192,
    "rotary_seq_len_interpolation_factor": None,
    "rotary_scaling_factor": 1.0,
    "yarn_original_max_position_embeddings": None,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.0,
    "yarn_correction_range_round_to_int": True,
    "yarn_attention_factor": None,
}
ROPE_FIELDS = tuple(MODEL_FIELD_DEFAULTS)
_LLAMA3_FIELDS = ("rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
                  "rope_scaling_original_max_position_embeddings")
_YARN_FIELDS = ("rotary_scaling_factor", "yarn_original_max_position_embeddings",
                "yarn_beta_fast", "yarn_beta_slow", "mscale", "mscale_all_dim",
                "yarn_correction_range_round_to_int", "yarn_attention_factor")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term, 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1).
    Written as transformers evaluates it, so attention factors agree bit for bit."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of a static RoPE base (HF ``rope_scaling`` / ``rope_parameters``).

    linear: every frequency divided by ``factor`` (the same as dividing positions by it).
    llama3: low frequencies divided by ``factor``, high ones kept, a smooth ramp between
            (``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
    yarn:   frequencies blended between interpolated (/ factor) and original along a ramp set by
            ``beta_fast`` / ``beta_slow`` rotations over ``original_max_position_embeddings``
            (``truncate``: ramp ends rounded to whole dimensions), and cos / sin multiplied by an
            attention factor (``attention_factor``, else from ``factor``, ``mscale`` and
            ``mscale_all_dim``). The fields keep HF's meaning, None where HF's key is absent.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise UserError(f"unsupported RoPE scaling {self.rope_type!r}: expected one of "
                            f"{ROPE_TYPES} (dynamic NTK is refused: its base changes per batch; "
                            "tools/rope_base.py gives a static base)")
        if not self.factor > 0:
            raise UserError(f"RoPE scaling factor must be > 0, got {self.factor}")
        if self.rope_type in ("llama3", "yarn") and self.original_max_position_embeddings < 1:
            raise UserError(f"{self.rope_type} RoPE scaling needs original_max_position_embeddings "
                            f">= 1, got {self.original_max_position_embeddings}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise UserError("llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got "
                            f"{self.high_freq_factor} <= {self.low_freq_factor}")
        if self.rope_type == "llama3" and not self.low_freq_factor > 0:
            raise UserError(f"llama3 RoPE scaling needs low_freq_factor > 0, got "
                            f"{self.low_freq_factor}")
        if self.rope_type == "yarn":
            if not (self.beta_fast > 0 and self.beta_slow > 0):
                raise UserError(f"yarn beta_fast / beta_slow must be > 0, got {self.beta_fast} / "
                                f"{self.beta_slow}")
            # transformers ignores one of mscale / mscale_all_dim without the other, and
            # Megatron's --mscale / --mscale-all-dim would not: refuse what cannot mean one thing.
            if bool(self.mscale) != bool(self.mscale_all_dim):
                raise UserError(
                    f"yarn mscale={self.mscale} with mscale_all_dim={self.mscale_all_dim}: "
                    "transformers uses them only together (both non-zero); set both, or neither "
                    "(attention_factor / --yarn-attention-factor sets the factor directly)")
            if self.attention_factor is not None and not self.attention_factor > 0:
                raise UserError(f"yarn attention_factor must be > 0, got {self.attention_factor}")

    # ---- numerics --------------------------------------------------------------------------

    def attention_scaling(self) -> float:
        """The factor transformers multiplies cos and sin by (1 except for YaRN)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return float(yarn_mscale(self.factor, self.mscale)
                         / yarn_mscale(self.factor, self.mscale_all_dim))
        return yarn_mscale(self.factor)

    # ---- Hugging Face ----------------------------------------------------------------------

    @classmethod
    def from_hf(cls, rope_config: Optional[Mapping],
                max_position_embeddings: Optional[int] = None) -> Optional["RopeScaling"]:
        """From an HF ``rope_scaling`` / ``rope_parameters`` dict (None / "default": None).
        ``max_position_embeddings``: what transformers assumes as the original context of a
        llama3 / yarn config that does not name one."""
        if not rope_config:
            return None
        rope_type = rope_config.get("rope_type", rope_config.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type not in ROPE_TYPES:
            raise UserError(f"unsupported HF rope_type {rope_type!r}: expected default, linear, "
                            "llama3 or yarn (dynamic NTK is refused: its base changes per batch; "
                            "tools/rope_base.py gives a static base)")
        if rope_config.get("factor") is None:
            raise UserError(f"rope_type {rope_type!r} needs a 'factor'")
        factor = float(rope_config["factor"])
        if rope_type == "linear":
            return cls("linear", factor)
        original = rope_config.get("original_max_position_embeddings", max_position_embeddings)
        if original is None:
            raise UserError(f"rope_type {rope_type!r} needs original_max_position_embeddings")
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if rope_config.get(key) is None:
                    raise UserError(f"rope_type 'llama3' needs {key!r}")
            return cls("llama3", factor, float(rope_config["low_freq_factor"]),
                       float(rope_config["high_freq_factor"]), int(original))
        optional = {key: rope_config.get(key) for key in YARN_HF_DEFAULTS}
        return cls(
            "yarn", factor, original_max_position_embeddings=int(original),
            # transformers reads these with `or`: an absent, None or 0 value means the default.
            beta_fast=float(optional["beta_fast"] or 32), beta_slow=float(optional["beta_slow"] or 1),
            mscale=None if optional["mscale"] is None else float(optional["mscale"]),
            mscale_all_dim=(None if optional["mscale_all_dim"] is None
                            else float(optional["mscale_all_dim"])),
            attention_factor=(None if optional["attention_factor"] is None
                              else float(optional["attention_factor"])),
            truncate=bool(True if optional["truncate"] is None else optional["truncate"]))

    def to_hf(self) -> Dict[str, Any]:
        """The HF dict: required keys always, YaRN's optional keys only where not HF's default
        (so a config that leaves them out is written back the same way)."""
        out: Dict[str, Any] = {"rope_type": self.rope_type, "factor": float(self.factor)}
        if self.rope_type == "llama3":
            out.update(low_freq_factor=float(self.low_freq_factor),
                       high_freq_factor=float(self.high_freq_factor),
                       original_max_position_embeddings=int(self.original_max_position_embeddings))
        elif self.rope_type == "yarn":
            out["original_max_position_embeddings"] = int(self.original_max_position_embeddings)
            for key, default in YARN_HF_DEFAULTS.items():
                value = getattr(self, key)
                if value != default:
                    out[key] = value
        return out

    # ---- Megatron flags / ModelConfig fields -----------------------------------------------

    def model_fields(self) -> Dict[str, Any]:
        """Our ModelConfig RoPE fields for this scaling (the others at their defaults)."""
        fields = dict(MODEL_FIELD_DEFAULTS)
        if self.rope_type == "linear":
            fields["rotary_seq_len_interpolation_factor"] = float(self.factor)
        elif self.rope_type == "llama3":
            fields.update(use_rope_scaling=True, rope_scaling_factor=float(self.factor),
                          rope_scaling_low_freq_factor=float(self.low_freq_factor),
                          rope_scaling_high_freq_factor=float(self.high_freq_factor),
                          rope_scaling_original_max_position_embeddings=int(
                              self.original_max_position_embeddings))
        else:
            fields.update(position_embedding_type="yarn", rotary_scaling_factor=float(self.factor),
                          yarn_original_max_position_embeddings=int(
                              self.original_max_position_embeddings),
                          yarn_beta_fast=float(self.beta_fast), yarn_beta_slow=float(self.beta_slow),
                          yarn_correction_range_round_to_int=bool(self.truncate),
                          yarn_attention_factor=self.attention_factor)
            if self.mscale and self.mscale_all_dim:
                fields.update(mscale=float(self.mscale), mscale_all_dim=float(self.mscale_all_dim))
        return fields

    @classmethod
    def from_model_fields(cls, fields: Any) -> Optional["RopeScaling"]:
        """From ModelConfig RoPE fields (a ModelConfig, an argparse namespace or a
        ``model_args.json`` dict; missing keys take their defaults). Raises UserError naming the
        flags when they contradict each other or would be ignored."""
        get = ((lambda k: fields.get(k, MODEL_FIELD_DEFAULTS[k])) if isinstance(fields, Mapping)
               else (lambda k: getattr(fields, k, MODEL_FIELD_DEFAULTS[k])))
        kind = get("position_embedding_type")
        if kind not in ("rope", "yarn"):
            raise UserError(f"--position-embedding-type {kind}: expected rope or yarn")
        chosen = [flag for flag, on in (
            ("--position-embedding-type yarn", kind == "yarn"),
            ("--use-rope-scaling", get("use_rope_scaling")),
            ("--rotary-seq-len-interpolation-factor",
             get("rotary_seq_len_interpolation_factor"))) if on]
        if len(chosen) > 1:
            raise UserError(f"{' and '.join(chosen)} are alternatives (RoPE scalings yarn, llama3, "
                            "linear); pass one of them")
        for group, owner, on in ((_LLAMA3_FIELDS, "--use-rope-scaling", get("use_rope_scaling")),
                                 (_YARN_FIELDS, "--position-embedding-type yarn", kind == "yarn")):
            if on:
                continue
            stray = [_flag(f) for f in group if get(f) != MODEL_FIELD_DEFAULTS[f]]
            if stray:
                raise UserError(f"{', '.join(stray)} set but read only with {owner}; add {owner} "
                                "or drop them")
        try:
            if kind == "yarn":
                return cls._yarn_from_fields(get)
            if get("use_rope_scaling"):
                return cls("llama3", float(get("rope_scaling_factor")),
                           float(get("rope_scaling_low_freq_factor")),
                           float(get("rope_scaling_high_freq_factor")),
                           int(get("rope_scaling_original_max_position_embeddings")))
        except UserError as err:
            raise UserError(f"RoPE scaling flags: {err}") from None
        factor = get("rotary_seq_len_interpolation_factor")
        return cls("linear", float(factor)) if factor else None

    @classmethod
    def _yarn_from_fields(cls, get) -> "RopeScaling":
        original = get("yarn_original_max_position_embeddings")
        if original is None:
            # Megatron-LM silently assumes 4096; a wrong original length moves every ramp.
            raise UserError("--position-embedding-type yarn needs "
                            "--yarn-original-max-position-embeddings (the context the model was "
                            "trained for; HF original_max_position_embeddings)")
        mscale, mscale_all_dim = float(get("mscale")), float(get("mscale_all_dim"))
        if (mscale, mscale_all_dim) == (1.0, 0.0):  # Megatron's defaults = HF's plain factor
            pair = (None, None)
        elif mscale and mscale_all_dim:
            pair = (mscale, mscale_all_dim)
        else:
            raise UserError(f"--mscale {mscale} --mscale-all-dim {mscale_all_dim}: transformers "
                            "has no such pair (it uses mscale only with a non-zero mscale_all_dim); "
                            "give both non-zero, or --yarn-attention-factor for the factor itself")
        attention = get("yarn_attention_factor")
        return cls("yarn", float(get("rotary_scaling_factor")),
                   original_max_position_embeddings=int(original),
                   beta_fast=float(get("yarn_beta_fast")), beta_slow=float(get("yarn_beta_slow")),
                   mscale=pair[0], mscale_all_dim=pair[1],
                   attention_factor=None if attention is None else float(attention),
                   truncate=bool(get("yarn_correction_range_round_to_int")))
