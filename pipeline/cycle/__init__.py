"""One defended retraining cycle: verify -> validate -> cap -> detect -> screen -> train -> gate -> sign and attest.

Every decision goes into the cross-cycle state (signed with the cycle's key) as soon as it is made and into a local
JSON report before anything is sent to MLflow, so neither a crash nor an unreachable tracking server loses it.
The manifests are read once: training reads through the intake's verified statements and the allow-list of the
shards accepted, and its read log must equal that list before anything is signed. A failed check, or any other
error, stops the cycle as `failed` with a one-line reason; a rejected model leaves the last accepted one in place.

The steps, in order (`orchestration._run`):

1. Start: load and check the config (`preflight`), take the state's lock, check the signed state is the newest of
   its history (`resume`), and skip the cycle when it ran this config on these manifests already (unless `--force`).
2. Verify: read each manifest once, check its signatures, anti-rollback version and every shard's digest
   (`intake.verify_and_read`); the statements verified are recorded in the state.
3. Validate and cap: each shard against the schema, each source against its limits (`stages._screen_inputs`);
   trusted shards, operator quarantines and earlier RONI decisions carry over.
4. Detect: the row-level detectors on every contributed shard still in play (`stages._detect`).
5. Screen: RONI on the new shards, per shard and per source, then the margin check (`stages._screen`).
6. Train: through the allow-list of the shards accepted, nothing else; the read log must equal that list
   (`reads`).
7. Gate: the model gate and the config's accuracy floors (`stages._judge`).
8. Sign and attest: an accepted model is signed with its SLSA attestation and registered (`release`).
9. Record: the report, DVC's metrics and plots, then MLflow (`outputs`).

The package, one concept a module: `orchestration` (`run_cycle`, rank 0 leads, the other ranks follow),
`resume` (the state a cycle starts from, the skip when nothing is new), `stages` (validation, detection, the
incoming model, screening, the gate), `reads` (the allow-list, the data module training reads through, the read
log's check), `outputs` (headline numbers, DVC outputs, MLflow logging), `outcome` (`CycleOutcome`). Everything
is importable from here.
"""

from trainguard.pipeline.cycle.orchestration import run_cycle
from trainguard.pipeline.cycle.outcome import CycleOutcome
from trainguard.pipeline.cycle.outputs import CHECKS, DECISIONS_TABLE
from trainguard.pipeline.cycle.reads import _training_data as _training_data
from trainguard.pipeline.cycle.stages import _decoders as _decoders
from trainguard.pipeline.cycle.stages import _judge as _judge
from trainguard.pipeline.cycle.stages import roni_holdout, screening_config
from trainguard.pipeline.intake import manifest_refs
from trainguard.pipeline.workdir import METRICS_FILE

__all__ = [
    "CHECKS",
    "DECISIONS_TABLE",
    "METRICS_FILE",
    "CycleOutcome",
    "manifest_refs",
    "roni_holdout",
    "run_cycle",
    "screening_config",
]
