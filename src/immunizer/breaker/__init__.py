"""The circuit breaker: canary drift statistics, the serving wrapper, the fine-tuning guard and
calibration (MISSION.md §2)."""
from immunizer.breaker.breaker import Breaker, BreakerTripped, Verdict
from immunizer.breaker.calibrate import CalibrationConfig, calibrate, load_calibration_config
from immunizer.breaker.guard import BreakerCallback, FinetuneGuard, guard_optimizer
from immunizer.breaker.incidents import record_incident
from immunizer.breaker.serving import GuardedModel, load_guarded

__all__ = ["Breaker", "BreakerTripped", "Verdict", "CalibrationConfig", "calibrate", "load_calibration_config",
           "BreakerCallback", "FinetuneGuard", "guard_optimizer", "record_incident", "GuardedModel", "load_guarded"]
