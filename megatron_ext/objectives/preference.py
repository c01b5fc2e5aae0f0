"""Preference alignment (LOGO, SimPO): chosen vs rejected answers of rows written by
``tools/preprocess_preference.py``; the per-micro-batch strategy is ``preference_step.py``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import List, Optional

from megatron_ext.config import ObjectiveConfig, RunConfig, section_from_namespace
from megatron_ext.data import token_flags
from megatron_ext.data.blend import parse_data_path
from megatron_ext.errors import ArgumentError

# Per-loss defaults: LOGO's released Llama-3 recipe (beta 10, gamma/beta 0.3, SFT weight 0.1),
# SimPO's own defaults (beta 2, gamma/beta 0.25, no SFT term), ORPO's (lambda 0.1 as TRL's beta,
# NLL weight 1) and the SFT-only baseline (NLL of the chosen answers).
PREFERENCE_DEFAULTS = {"logo": {"beta": 10.0, "gamma_beta_ratio": 0.3, "sft_weight": 0.1},
                       "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.25, "sft_weight": 0.0},
                       "orpo": {"beta": 0.1, "gamma_beta_ratio": 0.0, "sft_weight": 1.0},
                       "sft-only": {"beta": 1.0, "gamma_beta_ratio": 0.0, "sft_weight": 1.0},
                       # TRL's defaults: beta 0.1, no SFT term.
                       "dpo": {"beta": 0.1, "gamma_beta_ratio": 0.0, "sft_weight": 0.0},
                       "ipo": {"beta": 0.1, "gamma_beta_ratio": 0.0, "sft_weight": 0.0}}
# Losses without a reward margin, and the one without a preference term at all.
NO_MARGIN = ("orpo", "sft-only", "dpo", "ipo")
REFERENCE_LOSSES = ("dpo", "ipo")
NO_BETA = ("sft-only",)
# Optimiser settings of preference runs (LOGO's released recipe) unless the flags give others;
# pretraining keeps Megatron-LM's (adam beta2 0.95, weight decay 0.01).
PREFERENCE_OPTIMIZER_DEFAULTS = {"adam_beta2": 0.999, "weight_decay": 0.05}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The preference flags (the training parser adds them; on with preference data)."""
    g = p.add_argument_group("preference alignment (data from tools/preprocess_preference.py)")
    g.add_argument("--preference-loss", choices=sorted(PREFERENCE_DEFAULTS), default="logo",
                   help="logo: -log sigmoid(beta * (s_chosen - mean_j s_rejected_j) - gamma) + "
                        "sft_weight * CE(chosen), s = mean token log-prob of an answer; simpo: the "
                        "same with one rejected answer (--num-rejected 1); orpo: CE(chosen) + beta "
                        "x mean_j -log sigmoid(log odds ratio) (beta = ORPO's lambda); sft-only: "
                        "CE(chosen), the baseline")
    g.add_argument("--beta", type=float, default=None,
                   help="reward scale (default: 10 for logo, 2 for simpo)")
    margin = g.add_mutually_exclusive_group()
    margin.add_argument("--gamma", type=float, default=None,
                        help="absolute reward margin gamma (TRL's simpo_gamma)")
    margin.add_argument("--gamma-beta-ratio", type=float, default=None,
                        help="margin as gamma / beta, SimPO's and LOGO's convention (default 0.3 "
                             "for logo, 0.25 for simpo)")
    g.add_argument("--sft-weight", type=float, default=None,
                   help="weight of the chosen answer's token-mean cross entropy (default 0.1 for "
                        "logo, 0 for simpo)")
    g.add_argument("--num-rejected", type=int, default=None,
                   help="rejected answers per row (default: all that every row has; 1 for simpo)")
    g.add_argument("--reference-logps", default=None,
                   help="dpo / ipo: the reference model's answer log-probs, written once by "
                        "tools/reference_logps.py for this --data-path")
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                   help="dpo: conservative DPO's label smoothing eps (TRL's label_smoothing)")
    g.add_argument("--preference-packing", choices=["separate", "shared-prefix"],
                   default="shared-prefix",
                   help="shared-prefix: the prompt once, the answers as branches attending to it "
                        "and to themselves (same losses, a fraction of the compute); separate: "
                        "one prompt copy per answer")


@dataclasses.dataclass(frozen=True)
class PreferenceOptions:
    """The preference flags after ``validate`` filled the per-loss defaults."""

    preference_loss: str
    beta: float
    gamma: float
    sft_weight: float
    num_rejected: int
    preference_packing: str = "shared-prefix"
    gamma_beta_ratio: Optional[float] = None  # as given; ``gamma`` holds the margin it implies
    reference_logps: Optional[str] = None
    dpo_label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class PreferenceAlignment:
    name: str = "preference"

    def validate(self, args) -> None:
        """Loss defaults (per --preference-loss), the number of rejected answers (from the data
        when not given) and what does not combine with preference data."""
        prefixes = parse_data_path(args.data_path)[0]
        if len(prefixes) > 1 and args.preference_loss in REFERENCE_LOSSES:
            raise ArgumentError(f"--preference-loss {args.preference_loss} reads one reference "
                                "file per dataset: give --data-path one preference dataset "
                                "(preprocess several jsonl files together with --input a b c)")
        defaults = PREFERENCE_DEFAULTS[args.preference_loss]
        if args.preference_loss in NO_MARGIN and (args.gamma is not None
                                                  or args.gamma_beta_ratio is not None):
            raise ArgumentError(f"--preference-loss {args.preference_loss} has no reward margin: "
                                "drop --gamma / --gamma-beta-ratio")
        if args.preference_loss in NO_BETA and args.beta is not None:
            raise ArgumentError("--preference-loss sft-only trains the chosen answers' NLL only: "
                                "drop --beta")
        self._validate_reference(args)
        for field, value in PREFERENCE_OPTIMIZER_DEFAULTS.items():
            if getattr(args, field) is None:
                setattr(args, field, value)
        if args.beta is None:
            args.beta = defaults["beta"]
        if args.gamma is None:
            ratio = (args.gamma_beta_ratio if args.gamma_beta_ratio is not None
                     else defaults["gamma_beta_ratio"])
            args.gamma = args.beta * ratio
        if args.sft_weight is None:
            args.sft_weight = defaults["sft_weight"]
        if args.beta <= 0:
            raise ArgumentError(f"--beta must be > 0, got {args.beta}")
        if args.sft_weight < 0:
            raise ArgumentError(f"--sft-weight must be >= 0, got {args.sft_weight}")
        if args.num_rejected is None and args.preference_loss == "simpo":
            args.num_rejected = 1
        if args.num_rejected is None:  # what every row of the data has
            args.num_rejected = min(int((token_flags.read_meta(prefix) or {}).get(
                "min_rejected", 1)) for prefix in prefixes)
        if args.num_rejected < 1:
            raise ArgumentError(f"--num-rejected must be >= 1, got {args.num_rejected}")
        if args.preference_loss in REFERENCE_LOSSES:
            from megatron_ext.data.preference_samples import PreferenceRows
            from megatron_ext.objectives import reference_logps

            prefix = parse_data_path(args.data_path)[0][0]
            reference_logps.check(args.reference_logps, PreferenceRows(prefix).fingerprint(),
                                  args.num_rejected, prefix)
        if args.preference_loss == "simpo" and args.num_rejected != 1:
            raise ArgumentError("--preference-loss simpo compares one chosen and one rejected "
                                "answer: --num-rejected 1 (or use --preference-loss logo for M > 1)")
        if args.position_scheme not in ("contiguous", "logo"):
            raise ArgumentError(f"--position-scheme {args.position_scheme} is for text data; "
                                "preference data takes contiguous or logo")
        if args.document_packing is not None:
            raise ArgumentError("--document-packing is for text and chat data; preference rows "
                                "are packed by --preference-packing")
        if args.packed_documents or args.reset_attention_mask:
            raise ArgumentError("--packed-documents / --reset-attention-mask do not apply to "
                                "preference data: its branches are always masked from each other")
        if args.sequence_parallel and args.tensor_model_parallel_size > 1:
            raise ArgumentError("--sequence-parallel is not supported with preference data yet "
                                "(only answer positions reach the output layer, picked from whole "
                                "sequences); drop it")

    def config(self, args) -> ObjectiveConfig:
        return ObjectiveConfig(self.name, section_from_namespace(PreferenceOptions, args))

    @staticmethod
    def _validate_reference(args) -> None:
        """dpo / ipo need this dataset's reference file; the other losses take none."""
        if args.preference_loss not in REFERENCE_LOSSES:
            for flag, value, default in (("--reference-logps", args.reference_logps, None),
                                         ("--dpo-label-smoothing", args.dpo_label_smoothing, 0.0)):
                if value != default:
                    raise ArgumentError(f"{flag} is for --preference-loss dpo / ipo; drop it")
            return
        if not args.reference_logps:
            raise ArgumentError(f"--preference-loss {args.preference_loss} compares with a "
                                "reference model: compute its log-probs once with "
                                "tools/reference_logps.py and pass --reference-logps FILE")
        if args.position_scheme != "contiguous":
            raise ArgumentError(f"--preference-loss {args.preference_loss} with offline "
                                f"reference log-probs needs --position-scheme contiguous (the "
                                f"reference was scored at contiguous positions; "
                                f"{args.position_scheme} draws them per sample)")
        if not 0.0 <= args.dpo_label_smoothing < 0.5:
            raise ArgumentError(f"--dpo-label-smoothing must be in [0, 0.5), got "
                                f"{args.dpo_label_smoothing}")

    def datasets(self, cfg: RunConfig, tokenizer, num_samples: List[int]) -> list:
        from megatron_ext.data.gpt_data import build_preference_datasets

        options = cfg.objective.options
        return build_preference_datasets(
            cfg.data.data_blend, tokenizer, num_samples, split=cfg.data.split,
            seq_length=cfg.model.seq_length, num_rejected=options.num_rejected,
            packing=options.preference_packing, position_scheme=cfg.data.position_scheme,
            target_seq_length=cfg.data.target_seq_length, seed=cfg.training.seed)

    def build(self, cfg: RunConfig, device):
        from megatron_ext.objectives.preference_loss import PreferenceLossConfig
        from megatron_ext.objectives.preference_step import PreferenceObjective

        options = cfg.objective.options
        reference = None
        if options.preference_loss in REFERENCE_LOSSES:
            from megatron_ext.objectives import reference_logps

            reference = reference_logps.load(options.reference_logps, options.num_rejected)
        return PreferenceObjective(device, PreferenceLossConfig.from_options(options), reference)
