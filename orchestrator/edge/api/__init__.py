"""The HTTP API (FastAPI): everything the CLI can do, behind bearer tokens.

``create_app(settings)`` builds the app; ``vmorch api`` serves it with uvicorn. Routes live
under ``/api/v1`` in one small module per resource; ``auth`` decides who may do what,
``errors`` turns vmorch's error tree into JSON error bodies.
"""

from orchestrator.edge.api.app import create_app

__all__ = ["create_app"]
