"""User-facing errors: the CLI prints these as one clear message, with no traceback."""


class DpolabError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class ConfigError(DpolabError):
    """A configuration value is unknown or has the wrong type."""


class DataError(DpolabError):
    """Preference data is unreadable or has invalid rows."""


class ModelError(DpolabError):
    """A model could not be found or loaded."""


class TrainingError(DpolabError):
    """Training hit a state it cannot continue from (for example a non-finite loss)."""


class RunError(DpolabError):
    """Cells of an experiment failed; the finished ones are kept and a rerun with --resume runs the others."""
