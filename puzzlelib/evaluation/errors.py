"""The error every part of stage 06 raises when it cannot go on with its input.

What: ``EvaluationError``, defined once so that ``evaluation`` (the stage), ``throughput`` (speed
measurement) and ``report`` (the report files) raise the same class without importing each other;
import it from here. Reads and writes nothing; holds no logic.
"""


class EvaluationError(ValueError):
    """Stage 06 cannot run with this input; the message says what to change."""
