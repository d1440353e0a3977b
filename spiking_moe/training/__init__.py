"""Training, as small parts with one job each.

============================  ===============================================================
module                        what it holds
============================  ===============================================================
:mod:`.trainer`               :class:`Trainer` (the flat loop), :class:`TrainResult`, the loss
:mod:`.checkpoint`            atomic checkpoints, ``weights_only`` loads, RNG streams
:mod:`.sinks`                 TensorBoard and JSON-lines metric sinks
:mod:`.callbacks`             the :class:`Callback` protocol, router balancing, monitors, energy
:mod:`.model_energy`          a model's energy: counted (dense twin, across processes), priced
:mod:`.distributed`           joining a ``torchrun`` job, devices, reductions across ranks
============================  ===============================================================

Only this package uses :mod:`energy` inside ``spiking_moe``; the trainer reads what the model
returns (logits, aux loss, routing, activity) and never hooks into it.
"""

from .callbacks import (
    Callback,
    CallbackContext,
    EnergyReportCallback,
    FiringRateMonitor,
    RouterBiasBalancing,
    RoutingMonitor,
)
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    CheckpointLayoutError,
    check_single_process,
    gather_expert_checkpoint,
    load_checkpoint,
    previous_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .distributed import (
    DeviceError,
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    init_distributed,
    resolve_device,
)
from .model_energy import (
    check_energy_profile,
    count_energy,
    count_operations_parallel,
    energy_metrics,
    energy_profile_names,
    expert_parallel_counts,
    measure_energy,
    profile_precision,
    write_energy_report,
)
from .sinks import JSONLinesSink, MetricSink, TensorBoardSink
from .trainer import NonFiniteLossError, Trainer, TrainResult, activity_penalty, unpack_output

__all__ = [
    "CHECKPOINT_NAME",
    "Callback",
    "CallbackContext",
    "CheckpointError",
    "CheckpointLayoutError",
    "DeviceError",
    "DistInfo",
    "EnergyReportCallback",
    "FiringRateMonitor",
    "JSONLinesSink",
    "MetricSink",
    "NonFiniteLossError",
    "RouterBiasBalancing",
    "RoutingMonitor",
    "TensorBoardSink",
    "TrainResult",
    "Trainer",
    "activity_penalty",
    "all_gather_objects",
    "all_reduce_sum",
    "check_energy_profile",
    "check_single_process",
    "count_energy",
    "count_operations_parallel",
    "energy_metrics",
    "energy_profile_names",
    "expert_parallel_counts",
    "gather_expert_checkpoint",
    "init_distributed",
    "load_checkpoint",
    "measure_energy",
    "profile_precision",
    "previous_checkpoint",
    "resolve_device",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "unpack_output",
    "write_energy_report",
]
