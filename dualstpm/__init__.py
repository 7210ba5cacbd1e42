"""dualstpm: dual student-teacher feature pyramid matching for industrial anomaly detection."""

__version__ = "0.1.0"
