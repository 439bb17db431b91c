from defenses.adversarial import AdversarialTraining
from defenses.robust import RobustAccuracy
from defenses.trades import TRADES
from defenses.gate import GateVerdict, RONIGate
from defenses.heldout import HeldoutMetrics, LabeledData, heldout_metrics
from defenses.limits import capped_rows, check_source_caps, enforce_source_caps
from defenses.margin import check_margins, compare_margins
from defenses.report import ReportOutcome, record_screening
from defenses.roni import Candidate, CandidateDecision, ScreeningConfig, ScreeningReport, screen_candidates
from defenses.validation import Shard, ShardSchema, ShardVerdict, validate_shards
