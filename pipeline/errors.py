"""Errors astroflow reports to people: the CLI prints the message and exits non-zero, without a traceback."""


class AstroflowError(Exception):
    """Base of every error meant for the user; the message names the file, the field and what was expected."""


class ConfigError(AstroflowError):
    """An unknown key, a wrong type or an impossible value in params.yaml or a --set override."""


class DataError(AstroflowError):
    """Input data that cannot be read or does not have the expected schema."""


class ValidationFailed(AstroflowError):
    """The data loaded fine but broke one or more expectations (see the validation report)."""

    def __init__(self, message: str, *, summary_markdown: str | None = None) -> None:
        super().__init__(message)
        self.summary_markdown = summary_markdown
        """The human-readable validation summary, for callers that show it elsewhere (a Prefect artifact)."""


class CheckpointError(AstroflowError):
    """A checkpoint that is corrupt, truncated or does not match the configured model."""


class WouldOverwrite(AstroflowError):
    """A stage would replace a finished (or interrupted) run that nobody asked to replace."""
