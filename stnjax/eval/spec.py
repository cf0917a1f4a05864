"""The typed settings of an evaluation: trained models plus inference settings.

`EvalSpec.from_config(config)` is made once by a launcher: the models'
`TrainSpec` (which models to load, their identity, the data and folds) and
the config's `infer.*` fields, checked there (InputError names
`infer.<field>`). `with_inference` gives the same models with other
inference settings (a saliency-input variant, a sweep), and `record` is
the resolved config such an evaluation writes beside its results.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from stnjax.checks import InputError, check_range
from stnjax.infer.rounds import InferenceSpec, report_threshold
from stnjax.train.spec import TrainSpec


_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Evaluation of the models of `train` (fields: the config's infer.*)."""
    train: TrainSpec
    max_rounds: int = 10
    threshold: float = 0.99
    report_thresholds: tuple[float, ...] = (0.90, 0.95, 0.98, 0.99)
    run_all_rounds: bool = True
    batch_size: int = 8
    volume_buckets: tuple[int, ...] = (64, 128, 256, 320, 384, 448, 512)
    lcc_threshold: float = 0.5
    oracles: bool = False
    quantize_coarse: bool = True
    per_round_timing: bool = False
    saliency_input: str = "score"
    coarse_lcc: bool = False
    label: str = ""

    def __post_init__(self):
        if self.label and not _LABEL.fullmatch(self.label):
            raise InputError(f"infer.label: {self.label!r} is not a safe name for files and "
                             "tables: use letters, digits, '.', '_' and '-', not starting "
                             "with '.' or '-'")
        try:
            self.inference  # noqa: B018 - builds and checks the InferenceSpec
        except InputError as e:
            raise InputError(f"infer.{e}") from None
        check_range(self.lcc_threshold, "infer.lcc_threshold", 0.0, 1.0)
        for t in self.report_thresholds:
            check_range(t, "infer.report_thresholds", 0.0, 2.0, lo_open=True)
        if any(b < 1 for b in self.volume_buckets):
            raise InputError(f"infer.volume_buckets: expected positive sizes, "
                             f"got {self.volume_buckets}")
        try:  # the main threshold's mask must be one the loop keeps
            report_threshold(self.inference, self.threshold)
        except InputError:
            raise InputError(f"infer.threshold: {self.threshold} is not among "
                             f"infer.report_thresholds {self.report_thresholds}") from None

    @classmethod
    def from_config(cls, config: Any) -> "EvalSpec":
        """The spec of a whole config (ConfigDict or nested mapping)."""
        train = TrainSpec.from_config(config)
        if "infer" not in train.record:
            raise InputError("config: no 'infer' section")
        return cls.for_models(train, train.record["infer"])

    @classmethod
    def for_models(cls, train: TrainSpec, infer: Mapping[str, Any]) -> "EvalSpec":
        """The models of `train` with the inference settings `infer` (a
        mapping of infer.* fields); unknown fields raise InputError."""
        names = {f.name for f in dataclasses.fields(cls)} - {"train"}
        unknown = sorted(set(infer) - names)
        if unknown:
            raise InputError(f"infer.{unknown[0]}: no such inference setting")
        kinds = {"max_rounds": int, "threshold": float, "run_all_rounds": bool,
                 "batch_size": int, "lcc_threshold": float, "oracles": bool,
                 "quantize_coarse": bool, "per_round_timing": bool, "saliency_input": str,
                 "coarse_lcc": bool, "label": str}
        fields: dict[str, Any] = {k: kinds[k](v) for k, v in infer.items() if k in kinds}
        if "report_thresholds" in infer:
            fields["report_thresholds"] = tuple(float(t) for t in infer["report_thresholds"])
        if "volume_buckets" in infer:
            fields["volume_buckets"] = tuple(int(b) for b in infer["volume_buckets"])
        return cls(train=train, **fields)

    def with_inference(self, **fields: Any) -> "EvalSpec":
        """The same models with some infer.* settings replaced (checked)."""
        return EvalSpec.for_models(self.train, {**self.settings(), **fields})

    def settings(self) -> dict[str, Any]:
        """The infer.* fields as the config spells them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "train"}

    @property
    def inference(self) -> InferenceSpec:
        """The static settings of the pure inference (the stage-wise baseline
        fuses round 0 by majority vote and crops the raw image, as C2F)."""
        baseline = self.train.loop.method == "stagewise"
        return InferenceSpec(
            planes=self.train.data.planes, batch_size=self.batch_size,
            max_rounds=self.max_rounds, lcc_threshold=self.lcc_threshold,
            report_thresholds=self.report_thresholds,
            fusion="majority" if baseline else "mean", use_saliency=not baseline,
            quantize_coarse=self.quantize_coarse, saliency_input=self.saliency_input,
            coarse_lcc=self.coarse_lcc)

    @property
    def method(self) -> str:
        """The `method` of evaluation records: the training method, plus the
        saliency input when it is not the reference's ("rstn-sal-mask",
        "rstn-sal-coarse") and "-coarse-lcc" with infer.coarse_lcc, so that
        a sweep over several evaluation folders of the same models tells the
        variants apart; `label` when set."""
        if self.label:
            return self.label
        name = self.train.loop.method
        if self.inference.use_saliency and self.saliency_input != "score":
            name += f"-sal-{self.saliency_input}"
        return name + "-coarse-lcc" if self.coarse_lcc else name

    @property
    def record(self) -> dict[str, Any]:
        """The resolved config of this evaluation (the models' config with
        these inference settings), as written beside its results."""
        infer = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings().items()}
        return {**self.train.record, "infer": infer}
