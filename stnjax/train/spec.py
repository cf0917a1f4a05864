"""The typed settings of a training run, made from the config at the top.

A launcher reads its Python config once and turns it into a `TrainSpec`
(`TrainSpec.from_config`): data (`DataSpec`), model structure (`RSTN`),
optimiser (`OptimizerSpec`), loop (`LoopSpec`) and seed, every field checked
there, with errors naming the config field. The library below takes these
specs and never reads the config. The spec also keeps the resolved config
as a plain dict (`record`): it is what a run writes beside its results
(config.json) and what its identity hash is taken over (`workdir.config_hash`),
so a result folder names the same fields the user set.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Mapping

from stnjax.checks import InputError, check_int, check_range
from stnjax.data.spec import DataSpec
from stnjax.models.rstn import RSTN
from stnjax.train.schedule import Stage, parse_stages
from stnjax.train.steps import UNROLLED_MODES, OptimizerSpec
from stnjax.train import workdir as wd


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """The training loop's settings (the config's `train.*` fields that are
    not the optimiser's; launch/configs/common.py documents each)."""
    method: str = "rstn"
    stages: str = "S:10000,I:30000,J:40000"
    coarse_weight: float = 1.0 / 3.0
    bce_weight: float = 0.0
    log_every: int = 20
    checkpoint_every: int = 2000
    keep_checkpoints: int = 3
    guard_window: int = 200
    guard_coarse_loss: float = 0.9
    guard_max_restarts: int = 3
    multihost: bool = False
    devices: int = 0
    unroll_rounds: int = 1

    def __post_init__(self):
        parse_stages(self.stages, self.method)  # InputError naming train.stages / method
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "guard_window"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        check_range(self.coarse_weight, "train.coarse_weight", 0.0, 1.0)
        check_range(self.bce_weight, "train.bce_weight", 0.0)
        check_range(self.guard_coarse_loss, "train.guard_coarse_loss", 0.0, 1.0)
        if self.guard_max_restarts < 0:
            raise InputError(f"train.guard_max_restarts: must be >= 0, "
                             f"got {self.guard_max_restarts}")
        if self.devices < 0:
            raise InputError(f"train.devices: must be >= 0, got {self.devices}")
        check_int(self.unroll_rounds, "train.unroll_rounds", 1)
        if self.unroll_rounds > 1 and not any(st.mode in UNROLLED_MODES
                                              for st in self.stage_list):
            raise InputError(f"train.unroll_rounds: {self.unroll_rounds} rounds need a stage "
                             f"of mode {'/'.join(UNROLLED_MODES)} in train.stages "
                             f"({self.stages!r}); use 1")

    @property
    def stage_list(self) -> tuple[Stage, ...]:
        """The parsed stages with their [start, end) step ranges."""
        return parse_stages(self.stages, self.method)

    @property
    def guard_on(self) -> bool:
        """The convergence guard runs for RSTN training with restarts allowed."""
        return self.method == "rstn" and self.guard_max_restarts > 0

    @classmethod
    def from_config(cls, train: Any) -> "LoopSpec":
        """The spec of a config's `train` section (ConfigDict or mapping)."""
        t = train if isinstance(train, Mapping) else train.to_dict()
        ints = ("log_every", "checkpoint_every", "keep_checkpoints", "guard_window",
                "guard_max_restarts", "devices")
        floats = ("coarse_weight", "bce_weight", "guard_coarse_loss")
        # Absent from configs written before the field existed: 1 (the
        # reference). Checked, not coerced: 2.5 or "2" is an error.
        return cls(method=str(t["method"]), stages=str(t["stages"]),
                   multihost=bool(t["multihost"]), unroll_rounds=t.get("unroll_rounds", 1),
                   **{k: int(t[k]) for k in ints}, **{k: float(t[k]) for k in floats})


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Everything a training run reads: seed, data, model, optimiser, loop.

    Make it with `from_config`; to change a field, change the config (or
    its dict) and make the spec again, so `record` and the typed fields
    never disagree.
    """
    name: str
    seed: int
    data: DataSpec
    model: RSTN
    optimizer: OptimizerSpec
    loop: LoopSpec
    record: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_config(cls, config: Any) -> "TrainSpec":
        """The spec of a whole config (launch/configs/common.py schema), as a
        ConfigDict or a nested mapping; InputError names a bad field."""
        # The record: a JSON-safe nested dict (tuples become lists), as written.
        plain = config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))
        record = json.loads(json.dumps(plain, default=list))
        for section in ("data", "model", "train"):
            if section not in record:
                raise InputError(f"config: no {section!r} section (has {sorted(record)})")
        return cls(name=str(record.get("name", "")), seed=int(record["seed"]),
                   data=DataSpec.from_config(record["data"]),
                   model=RSTN.from_config(record["model"]),
                   optimizer=OptimizerSpec.from_config(record["train"]),
                   loop=LoopSpec.from_config(record["train"]), record=record)

    def __post_init__(self):
        if self.data.negatives > 0 and not self.loop.bce_weight > 0:
            raise InputError(
                f"data.negatives: {self.data.negatives} adds organ-free slices, whose Dice "
                "terms are 0 (losses.joint_loss): they train through the cross-entropy "
                "only, and train.bce_weight is 0; set train.bce_weight > 0 or "
                "data.negatives=0")

    @property
    def config_hash(self) -> str:
        """The identity of the trained models (`workdir.config_hash`)."""
        return wd.config_hash(self.record)
