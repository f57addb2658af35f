"""vmorch's orchestrator: the library the CLI, the API and the workers share."""

__version__ = "0.1.0"
